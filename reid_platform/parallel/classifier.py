"""Model-parallel classifier: each worker owns a contiguous slice of the class-weight rows.

Forward, on every rank:

    X = all_gather(embeddings)            (global batch x d; backward sums into the owner's rows)
    Y = all_gather(labels)
    rows = every local class in Y + random local negatives, up to sample_rate x C_r (Partial FC)
    loss = sharded_margin_loss(X, W_r[rows])  (chunked; distributed log-sum-exp over ranks)

Communication per step, whatever the number of classes: a gather of the B x d features and the
labels, three all-reduces of B-vectors, and in backward one all-reduce of the gathered features'
gradient (W*B x d, the largest transfer). The weight is not in DDP: its gradient is already
complete on the owner because every rank sees the whole global batch. The classifier updates its own
rows (SGD with momentum) so that with sampling only the sampled rows and their momentum are touched.

Checkpoints store each slice with its global row range, so a run saved with W workers loads with any
other W' (each rank reads just the rows it now owns).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from reid_platform.parallel.comm import all_gather_with_grad
from reid_platform.parallel.losses import MarginSpec, columns_in_range, sharded_margin_loss

SHARD_FILE = "rows-{start:012d}-{end:012d}.safetensors"
ROWS_NAME = re.compile(r"rows-(\d{12})-(\d{12})\.safetensors")
LAYOUT_FILE = "classifier.json"


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the rows owned by ``rank``: C // W each, one more for the first C % W ranks."""
    if num_classes < world_size:
        raise ValueError(f"{num_classes} classes cannot be split over {world_size} workers")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class ShardedClassifier(nn.Module):
    def __init__(
        self,
        num_classes: int,
        dim: int,
        rank: int = 0,
        world_size: int = 1,
        loss: MarginSpec = MarginSpec(),
        sample_rate: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes, self.dim, self.loss = num_classes, dim, loss
        self.rank, self.world_size = rank, world_size
        self.sample_rate, self.momentum, self.weight_decay = sample_rate, momentum, weight_decay
        self.start, self.end = shard_range(num_classes, rank, world_size)
        # Each rank draws its own rows in place: a huge classifier never exists whole anywhere.
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + self.start)
        weight = torch.empty(self.end - self.start, dim, device=device)
        self.weight = nn.Parameter(weight.normal_(0.0, 0.01, generator=generator))
        self.register_buffer("momentum_buffer", torch.zeros_like(weight))
        # negatives differ per rank and do not depend on anything else drawing random numbers
        self._sampler = torch.Generator(device).manual_seed(seed * 1_000_003 + self.start + 1)
        self._active: tuple[torch.Tensor | None, torch.Tensor] | None = None

    @property
    def local_classes(self) -> int:
        return self.end - self.start

    def gather(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch, identical on every rank; gradients flow back to each sample's owner."""
        if self.world_size == 1:
            return embeddings, labels
        all_labels = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(all_labels, labels)
        return all_gather_with_grad(embeddings), torch.cat(all_labels)

    def local_target(self, labels: torch.Tensor) -> torch.Tensor:
        """Column of each label in this shard, -1 where another rank owns the class."""
        return columns_in_range(labels, self.start, self.local_classes)

    def sample_rows(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted local rows to use, target remapped to positions in them).

        Every positive class of the global batch is kept; random negatives fill up to
        ``sample_rate`` of the local classes.
        """
        positives = torch.unique(target[target >= 0])
        # at least one row, so a rank whose classes are all absent still joins the collectives
        wanted = max(1, int(self.sample_rate * self.local_classes), positives.numel())
        count = min(self.local_classes, wanted)
        score = torch.rand(self.local_classes, device=target.device, generator=self._sampler)
        score[positives] = 2.0  # above any random score: positives are always picked
        rows = torch.topk(score, count, sorted=False).indices.sort().values
        remapped = torch.searchsorted(rows, target.clamp_min(0))
        return rows, torch.where(target >= 0, remapped, -1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin loss of this rank's (embeddings, labels) over all classes of all ranks."""
        embeddings, labels = self.gather(embeddings, labels)
        target = self.local_target(labels)
        if self.sample_rate < 1.0 and self.training:
            rows, target = self.sample_rows(target)
            active = self.weight.detach()[rows].requires_grad_(True)  # a leaf: no dense gradient
        else:
            rows, active = None, self.weight
        self._active = (rows, active)
        return sharded_margin_loss(embeddings, active, target, self.loss)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """SGD with momentum and weight decay on the rows the last forward used (torch.optim.SGD's rule).

        torch.optim.SGD would visit every row and allocate full-size temporaries; here only the
        sampled rows and their momentum are read and written.
        """
        if self._active is None or self._active[1].grad is None:
            raise RuntimeError("step() needs a forward and backward pass first")
        rows, active = self._active
        grad = active.grad
        if rows is None:
            weight, momentum = self.weight.data, self.momentum_buffer
        else:
            weight, momentum = active.detach(), self.momentum_buffer[rows]
        grad.add_(weight, alpha=self.weight_decay)
        momentum.mul_(self.momentum).add_(grad)
        weight.add_(momentum, alpha=-lr)
        if rows is not None:
            self.weight.data.index_copy_(0, rows, weight)
            self.momentum_buffer.index_copy_(0, rows, momentum)
        active.grad = None
        self._active = None

    # -- world-size-independent checkpoints ---------------------------------------------------

    def save_shard(self, directory: Path) -> None:
        """Write this rank's rows and momentum under their global row range."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().contiguous(), "momentum": self.momentum_buffer.contiguous()}
        save_file({k: v.cpu() for k, v in tensors.items()}, directory / SHARD_FILE.format(start=self.start, end=self.end))
        if self.rank == 0:
            layout = {"num_classes": self.num_classes, "dim": self.dim}
            (directory / LAYOUT_FILE).write_text(json.dumps(layout))

    @torch.no_grad()
    def load_shards(self, directory: Path) -> None:
        """Fill this rank's rows from slices saved with any world size."""
        try:
            layout = json.loads((directory / LAYOUT_FILE).read_text())
        except FileNotFoundError:
            raise ValueError(f"{directory}: not a classifier checkpoint (no {LAYOUT_FILE})") from None
        if (layout["num_classes"], layout["dim"]) != (self.num_classes, self.dim):
            raise ValueError(
                f"{directory}: classifier checkpoint has {layout['num_classes']} classes x "
                f"{layout['dim']} dims, this run expects {self.num_classes} x {self.dim}"
            )
        filled = torch.zeros(self.local_classes, dtype=torch.bool)
        for path in sorted(directory.glob("rows-*.safetensors")):
            match = ROWS_NAME.fullmatch(path.name)
            if match is None:
                raise ValueError(f"{path}: not a classifier slice name ({SHARD_FILE})")
            start, end = int(match.group(1)), int(match.group(2))
            lo, hi = max(start, self.start), min(end, self.end)
            if lo >= hi:
                continue
            with safe_open(path, framework="pt") as saved:  # reads only the overlapping rows
                for name, target in (("weight", self.weight), ("momentum", self.momentum_buffer)):
                    target[lo - self.start : hi - self.start] = saved.get_slice(name)[lo - start : hi - start]
            filled[lo - self.start : hi - self.start] = True
        if not filled.all():
            missing = self.start + int(torch.nonzero(~filled)[0])
            raise ValueError(
                f"{directory}: classifier slices cover {int(filled.sum())} of rows [{self.start}, {self.end}); "
                f"row {missing} is in none"
            )
