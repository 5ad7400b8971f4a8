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
from tqdm import tqdm

from reid_platform.config import InputConfig
from reid_platform.data.pack import read_manifest
from reid_platform.evaluation.metrics import (
    EvaluationError,
    FeatureSet,
    Metric,
    QueryResults,
    RetrievalMetrics,
    rank_queries,
    summarize,
)
from reid_platform.input.dali import Partition, eval_batches
from reid_platform.model.backbone import ReIDNet
from reid_platform.parallel.comm import all_gather_rows


@torch.no_grad()
def extract_features(
    model: ReIDNet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    description: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised features, meta rows [label, person_id, camera_id, index]) of ``batches``."""
    was_training = model.training
    model.eval()
    features, metas = [], []
    for images, meta in tqdm(batches, desc=description, unit="batch", disable=description is None):
        features.append(model.embed(images.to(device)).float().cpu())
        metas.append(meta.cpu())
    model.train(was_training)
    return torch.cat(features), torch.cat(metas)


def _in_dataset_order(split: str, expected: int, features: torch.Tensor, meta: torch.Tensor) -> FeatureSet:
    features, meta = all_gather_rows(features), all_gather_rows(meta)
    order = torch.argsort(meta[:, 3])
    if not torch.equal(meta[order, 3], torch.arange(expected)):
        raise EvaluationError(
            f"{split}: the workers read {len(meta)} samples ({meta[:, 3].unique().numel()} distinct), "
            f"the manifest lists {expected}"
        )
    return FeatureSet(features[order], meta[order, 1], meta[order, 2])


def evaluate_model(
    model: ReIDNet,
    shards_dir,
    input_cfg: InputConfig,
    partition: Partition,
    device: torch.device,
    metric: Metric = "cosine",
    batch_size: int = 128,
    progress: bool = False,
) -> RetrievalMetrics:
    """Query-vs-gallery metrics of ``model``; every rank of the group returns the same numbers."""
    manifest = read_manifest(shards_dir)
    sets = {}
    for split in ("query", "gallery"):
        batches = eval_batches(shards_dir, split, partition, input_cfg, batch_size)
        description = f"embedding {split}" if progress else None
        expected = manifest["splits"][split]["samples"]
        sets[split] = _in_dataset_order(split, expected, *extract_features(model, batches, device, description))
    query, gallery = sets["query"], sets["gallery"]
    bounds = torch.linspace(0, len(query), partition.world_size + 1).long().tolist()
    mine = slice(bounds[partition.rank], bounds[partition.rank + 1])
    local = rank_queries(query, gallery, metric, rows=mine)
    if dist.is_available() and dist.is_initialized():
        local = QueryResults(
            first_rank=all_gather_rows(local.first_rank),
            average_precision=all_gather_rows(local.average_precision),
            inverse_negative_penalty=all_gather_rows(local.inverse_negative_penalty),
            valid=all_gather_rows(local.valid.to(torch.uint8)).bool(),  # gloo has no bool
        )
    return summarize(local)
