"""The distributed evaluator: feature extraction and ranking across the workers of a run.

Each rank embeds its own part of query and gallery (DALI reads ``shard_id = rank``); the parts are
gathered (features only, N x d, never a distance matrix) and put back in dataset order. Each rank then
ranks a contiguous slice of the queries against the whole gallery and the per-query results are
gathered. Summing them in query order makes the result identical to a single-process evaluation
whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from tqdm import tqdm

from reid_platform.data.manifest import ShardDataset
from reid_platform.data.shard_format import CAMERA_ID, META_FIELDS, PERSON_ID, SAMPLE_INDEX
from reid_platform.errors import EvaluationError
from reid_platform.evaluation.config import EvaluationConfig
from reid_platform.evaluation.distance import Distances
from reid_platform.evaluation.metrics import FeatureSet, QueryResults, RetrievalMetrics, check_sets, summarize
from reid_platform.evaluation.ranking import make_distances, rank_queries
from reid_platform.input.backend import eval_batches
from reid_platform.input.config import InputConfig
from reid_platform.input.partition import Partition
from reid_platform.model.backbone import ReIDNet
from reid_platform.parallel.comm import all_gather_rows


@dataclass(frozen=True)
class Evaluation:
    metrics: RetrievalMetrics
    results: QueryResults  # per query, for longer CMC curves and for picking queries to show
    query: FeatureSet
    gallery: FeatureSet
    distances: Distances
    cfg: EvaluationConfig


@torch.no_grad()
def extract_features(
    model: ReIDNet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    description: str | None = None,
    flip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised features, meta rows [label, person_id, camera_id, index]) of ``batches``; with
    ``flip``, each image's embedding averaged with its mirror's."""
    was_training = model.training
    model.eval()
    # a rank whose part is empty (more ranks than shards) still joins the gather with no rows
    features = [torch.zeros(0, model.feature_dim)]
    metas = [torch.zeros(0, len(META_FIELDS), dtype=torch.int64)]
    dtype = next(model.parameters()).dtype  # float32, or a numerical test's float64
    for images, meta in tqdm(batches, desc=description, unit="batch", disable=description is None):
        features.append(model.embed(images.to(device, dtype), flip).float().cpu())
        metas.append(meta.cpu())
    model.train(was_training)
    return torch.cat(features), torch.cat(metas)


def _in_dataset_order(split: str, expected: int, features: torch.Tensor, meta: torch.Tensor) -> FeatureSet:
    features, meta = all_gather_rows(features), all_gather_rows(meta)
    order = torch.argsort(meta[:, SAMPLE_INDEX])
    if not torch.equal(meta[order, SAMPLE_INDEX], torch.arange(expected)):
        raise EvaluationError(
            f"{split}: the workers read {len(meta)} samples "
            f"({meta[:, SAMPLE_INDEX].unique().numel()} distinct), the manifest lists {expected}"
        )
    return FeatureSet(features[order], meta[order, PERSON_ID], meta[order, CAMERA_ID])


def rank_across_ranks(
    query: FeatureSet, gallery: FeatureSet, distances: Distances, cfg: EvaluationConfig, partition: Partition
) -> QueryResults:
    """Every rank ranks its slice of the queries; every rank returns all per-query results."""
    if partition.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"rank {partition.rank} of {partition.world_size}: no process group to gather results")
    rank, world_size, total = partition.rank, partition.world_size, len(query)
    mine = slice(total * rank // world_size, total * (rank + 1) // world_size)
    local = rank_queries(query, gallery, distances, cfg, rows=mine)
    if partition.world_size == 1:
        return local
    gathered = {f.name: getattr(local, f.name) for f in fields(QueryResults)}
    gathered["valid"] = gathered["valid"].to(torch.uint8)  # gloo has no bool
    gathered = {name: all_gather_rows(value) for name, value in gathered.items()}
    return QueryResults(**{**gathered, "valid": gathered["valid"].bool()})


def evaluate_model(
    model: ReIDNet,
    dataset: ShardDataset,
    input_cfg: InputConfig,
    partition: Partition,
    device: torch.device,
    cfg: EvaluationConfig = EvaluationConfig(),
    batch_size: int = 128,
    progress: bool = False,
) -> Evaluation:
    """Query-vs-gallery evaluation of ``model``; every rank of the group returns the same numbers.

    ``input_cfg`` gives the preprocessing and the reader (backend, threads); no augmentation is
    applied. With re-ranking, every rank builds the same re-ranked distances from the gathered
    features (the neighbour search is repeated per rank rather than exchanged).
    """
    sets = {}
    for split in ("query", "gallery"):
        batches = eval_batches(dataset, split, partition, input_cfg, batch_size)
        description = f"embedding {split}" if progress else None
        expected = dataset.split(split).samples
        features = extract_features(model, batches, device, description, cfg.flip)
        sets[split] = _in_dataset_order(split, expected, *features)
    query, gallery = sets["query"], sets["gallery"]
    check_sets(query, gallery)
    distances = make_distances(query, gallery, cfg)
    results = rank_across_ranks(query, gallery, distances, cfg, partition)
    return Evaluation(summarize(results), results, query, gallery, distances, cfg)
