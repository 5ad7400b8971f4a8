"""Feature extraction and evaluation across the workers of a run.

Each rank embeds its own part of query and gallery (DALI reads ``shard_id = rank``); the parts are
gathered and put back in dataset order, then each rank ranks a contiguous slice of the queries against
the whole gallery and the per-query results are gathered. Summing them in query order makes the
result identical to a single-process evaluation whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from reid_platform.config import InputConfig
from reid_platform.evaluation.metrics import FeatureSet, Metric, QueryResults, RetrievalMetrics, rank_queries, summarize
from reid_platform.input.dali import Partition, eval_batches
from reid_platform.parallel.comm import all_gather_rows


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    description: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised features, meta rows [label, person_id, camera_id, index]) of ``batches``."""
    was_training = model.training
    model.eval()
    features, metas = [], []
    for images, meta in tqdm(batches, desc=description, unit="batch", disable=description is None):
        features.append(torch.nn.functional.normalize(model(images.to(device)), dim=1).float().cpu())
        metas.append(meta.cpu())
    model.train(was_training)
    return torch.cat(features), torch.cat(metas)


def _in_dataset_order(features: torch.Tensor, meta: torch.Tensor) -> FeatureSet:
    features, meta = all_gather_rows(features), all_gather_rows(meta)
    order = torch.argsort(meta[:, 3])
    return FeatureSet(features[order], meta[order, 1], meta[order, 2])


def evaluate_model(
    model: nn.Module,
    shards_dir,
    input_cfg: InputConfig,
    partition: Partition,
    device: torch.device,
    metric: Metric = "cosine",
    batch_size: int = 128,
    progress: bool = False,
) -> RetrievalMetrics:
    """Query-vs-gallery metrics of ``model``; every rank of the group returns the same numbers."""
    sets = {}
    for split in ("query", "gallery"):
        batches = eval_batches(shards_dir, split, partition, input_cfg, batch_size)
        description = f"embedding {split}" if progress else None
        sets[split] = _in_dataset_order(*extract_features(model, batches, device, description))
    query, gallery = sets["query"], sets["gallery"]
    bounds = torch.linspace(0, len(query), partition.world_size + 1).long().tolist()
    mine = slice(bounds[partition.rank], bounds[partition.rank + 1])
    local = rank_queries(FeatureSet(query.features[mine], query.person_ids[mine], query.camera_ids[mine]), gallery, metric)
    if dist.is_available() and dist.is_initialized():
        local = QueryResults(
            first_rank=all_gather_rows(local.first_rank),
            average_precision=all_gather_rows(local.average_precision),
            inverse_negative_penalty=all_gather_rows(local.inverse_negative_penalty),
            valid=all_gather_rows(local.valid.to(torch.uint8)).bool(),  # gloo has no bool
        )
    return summarize(local)
