"""Model-parallel classifier: each worker owns a contiguous slice of the class-weight rows.

Forward, on every rank:

    X = all_gather(embeddings)            (global batch x d; backward sums into the owner's rows)
    Y = all_gather(labels)
    cos = normalize(X) @ normalize(W_r)^T  (global batch x local classes; never global x all classes)
    loss = distributed_cross_entropy(circle_logits(cos))

Communication per step is one gather of B x d features and labels and three all-reduces of
B-vectors, whatever the number of classes. The weight is a plain parameter, not in DDP: its gradient
is already complete on the owner because every rank sees the whole global batch.

Checkpoints store each slice with its global row range, so a run saved with W workers loads with any
other W' (each rank reads just the rows it now owns).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from reid_platform.parallel.comm import all_gather_with_grad
from reid_platform.parallel.losses import circle_logits, distributed_cross_entropy

SHARD_FILE = "rows-{start:012d}-{end:012d}.safetensors"
LAYOUT_FILE = "classifier.json"


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the rows owned by ``rank``: C // W each, one more for the first C % W ranks."""
    if num_classes < world_size:
        raise ValueError(f"{num_classes} classes cannot be split over {world_size} workers")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(frozen=True)
class CircleSpec:
    gamma: float = 128.0
    margin: float = 0.25


class ShardedCircleClassifier(nn.Module):
    def __init__(
        self,
        num_classes: int,
        dim: int,
        rank: int = 0,
        world_size: int = 1,
        loss: CircleSpec = CircleSpec(),
        seed: int = 0,
    ):
        super().__init__()
        self.num_classes, self.dim, self.loss = num_classes, dim, loss
        self.rank, self.world_size = rank, world_size
        self.start, self.end = shard_range(num_classes, rank, world_size)
        # Each rank draws its own rows: a huge classifier is never materialised in one place.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + self.start)
        self.weight = nn.Parameter(torch.randn(self.end - self.start, dim, generator=generator) * 0.01)

    def gather(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch, identical on every rank; gradients flow back to each sample's owner."""
        if self.world_size == 1:
            return embeddings, labels
        all_labels = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(all_labels, labels)
        return all_gather_with_grad(embeddings), torch.cat(all_labels)

    def local_cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).t()

    def local_target(self, labels: torch.Tensor) -> torch.Tensor:
        """Column of each label in this shard, -1 where another rank owns the class."""
        local = labels - self.start
        return torch.where((local >= 0) & (local < self.end - self.start), local, -1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Circle loss of this rank's (embeddings, labels) over all classes of all ranks."""
        embeddings, labels = self.gather(embeddings, labels)
        target = self.local_target(labels)
        logits = circle_logits(self.local_cosine(embeddings.to(self.weight.dtype)), target, self.loss.gamma, self.loss.margin)
        return distributed_cross_entropy(logits, target)

    # -- world-size-independent checkpoints ---------------------------------------------------

    def save_shard(self, directory: Path, optimizer: torch.optim.Optimizer) -> None:
        """Write this rank's rows (and momentum) under their global row range."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().contiguous()}
        momentum = optimizer.state.get(self.weight, {}).get("momentum_buffer")
        if momentum is not None:
            tensors["momentum"] = momentum.contiguous()
        save_file(tensors, directory / SHARD_FILE.format(start=self.start, end=self.end))
        if self.rank == 0:
            layout = {"num_classes": self.num_classes, "dim": self.dim}
            (directory / LAYOUT_FILE).write_text(json.dumps(layout))

    @torch.no_grad()
    def load_shards(self, directory: Path, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Fill this rank's rows from slices saved with any world size."""
        layout = json.loads((directory / LAYOUT_FILE).read_text())
        if (layout["num_classes"], layout["dim"]) != (self.num_classes, self.dim):
            raise ValueError(
                f"{directory}: classifier checkpoint has {layout['num_classes']} classes x "
                f"{layout['dim']} dims, this run expects {self.num_classes} x {self.dim}"
            )
        momentum = torch.zeros_like(self.weight)
        filled = 0
        for path in sorted(directory.glob("rows-*.safetensors")):
            start, end = (int(part) for part in path.stem.split("-")[1:])
            lo, hi = max(start, self.start), min(end, self.end)
            if lo >= hi:
                continue
            with safe_open(path, framework="pt") as saved:  # reads only the overlapping rows
                self.weight[lo - self.start : hi - self.start] = saved.get_slice("weight")[lo - start : hi - start]
                if "momentum" in saved.keys():
                    momentum[lo - self.start : hi - self.start] = saved.get_slice("momentum")[lo - start : hi - start]
            filled += hi - lo
        if filled != self.end - self.start:
            raise ValueError(
                f"{directory}: classifier slices cover {filled} of rows [{self.start}, {self.end})"
            )
        if optimizer is not None:
            optimizer.state[self.weight]["momentum_buffer"] = momentum
