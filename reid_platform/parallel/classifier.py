"""Model-parallel classifier: each worker owns a contiguous slice of the class-weight rows.

Forward, on every rank, from the global batch (X, Y) that ``parallel.criterion.Criterion`` gathers
(``comm.gather_global_batch``, whose backward carries the gradient contract below):

    rows = every local class in Y + random local negatives, up to sample_rate x C_r (Partial FC)
    loss = sharded_margin_loss(X, W_r[rows])  (chunked; distributed log-sum-exp over ranks)

Communication per step, whatever the number of classes: a gather of the B x d features and the
labels, two all-reduces of B-vectors (the row maximum; the sums of exponentials and positive logits),
and in backward one all-reduce of the gathered features' gradient (W*B x d, the largest transfer).
The weight is not in DDP: its gradient is already complete on the owner because every rank sees the
whole global batch. The classifier updates its own rows (``row_optim.py``: SGD, Adam or AdamW, which
holds the base learning rate), so that with sampling only the sampled rows and their optimizer state
are touched.

Gradient contract: through the gather, the gradient sent back to each rank's embeddings is what a
DDP backbone needs (DDP's averaging over ranks is compensated inside the gather); callers scale nothing.

State is world-size independent: each rank's rows are kept under their global row range, so a run
saved with W workers loads with any other W' (each rank reads just the rows it now owns; the files
are ``classifier_files.py``'s).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from reid_platform.errors import ModelFormatError
from reid_platform.parallel.config import LossConfig
from reid_platform.parallel.losses import columns_in_range, sharded_margin_loss
from reid_platform.parallel.row_optim import RowOptimizer, RowSGD, update_rows

INIT_BLOCK_ROWS = 4096


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the rows owned by ``rank``: C // W each, one more for the first C % W ranks."""
    if num_classes < world_size:
        raise ValueError(f"{num_classes} classes cannot be split over {world_size} workers")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def initial_rows(start: int, end: int, dim: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """Rows [start, end) of the initial class weights, N(0, 0.01^2), the same whatever the world size.

    Each rank draws only the rows it owns (a huge classifier never exists whole anywhere), in fixed
    blocks of INIT_BLOCK_ROWS rows seeded by (seed, block): a run on 1 or on 8 workers starts from
    the same classifier.
    """
    weight = torch.empty(end - start, dim, device=device)
    for block in range(start // INIT_BLOCK_ROWS, (end - 1) // INIT_BLOCK_ROWS + 1):
        first = block * INIT_BLOCK_ROWS
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + block)
        rows = torch.empty(INIT_BLOCK_ROWS, dim, device=device).normal_(0.0, 0.01, generator=generator)
        lo, hi = max(first, start), min(first + INIT_BLOCK_ROWS, end)
        weight[lo - start : hi - start] = rows[lo - first : hi - first]
    return weight


class ShardedClassifier(nn.Module):
    """Shard ``rank`` of ``world_size`` of the class weights (training passes the process group's:
    ``Partition.of_process_group``; a test may build every shard in one process). Its rows are
    updated by ``optimizer`` (training builds ``train.optimizer``'s row-wise twin,
    ``train/optimizers.classifier_optimizer``; the default, SGD at 0.1 with momentum, is for the
    tests and benchmarks that step a classifier by hand)."""

    def __init__(
        self,
        num_classes: int,
        dim: int,
        rank: int = 0,
        world_size: int = 1,
        loss: LossConfig = LossConfig(),
        optimizer: RowOptimizer = RowSGD(lr=0.1, momentum=0.9, weight_decay=0.0),
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.num_classes, self.dim, self.loss = num_classes, dim, loss
        self.rank, self.world_size = rank, world_size
        self.sample_rate, self.optimizer = loss.sample_rate, optimizer
        self.start, self.end = shard_range(num_classes, rank, world_size)
        self.weight = nn.Parameter(initial_rows(self.start, self.end, dim, seed, device))
        for name, tensor in optimizer.initial_state(self.weight.detach()).items():
            self.register_buffer(f"state_{name}", tensor)  # buffers move with .to(device) and .double()
        # negatives differ per rank and do not depend on anything else drawing random numbers
        self._sampler = torch.Generator(device).manual_seed(seed * 1_000_003 + self.start + 1)
        self._active: tuple[torch.Tensor | None, torch.Tensor] | None = None

    @property
    def local_classes(self) -> int:
        return self.end - self.start

    def local_target(self, labels: torch.Tensor) -> torch.Tensor:
        """Column of each label in this shard, -1 where another rank owns the class."""
        return columns_in_range(labels, self.start, self.local_classes)

    def sample_rows(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted local rows to use, target remapped to positions in them).

        Every positive class of the global batch is kept; random negatives fill up to
        ``sample_rate`` of the local classes.
        """
        positives = torch.unique(target[target >= 0])
        count = active_row_count(self.local_classes, self.sample_rate, positives.numel())
        score = torch.rand(self.local_classes, device=target.device, generator=self._sampler)
        score[positives] = 2.0  # above any random score: positives are always picked
        rows = torch.topk(score, count, sorted=False).indices.sort().values
        remapped = torch.searchsorted(rows, target.clamp_min(0))
        return rows, torch.where(target >= 0, remapped, -1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin loss of the global batch (the same on every rank) over all classes of all ranks.

        ``embeddings`` and ``labels`` are the whole global batch, as ``comm.gather_global_batch``
        gives it (``Criterion`` gathers it; in one process, the batch itself).
        """
        target = self.local_target(labels)
        if self.sample_rate < 1.0 and self.training:
            rows, target = self.sample_rows(target)
            active = self.weight.detach()[rows].requires_grad_(True)  # a leaf: no dense gradient
        else:
            rows, active = None, self.weight
        self._active = (rows, active)
        return sharded_margin_loss(embeddings, active, target, self.loss)

    def state(self, name: str) -> torch.Tensor:
        """This rank's rows of one tensor of the optimizer state (``optimizer.state_names``)."""
        return getattr(self, f"state_{name}")

    @torch.no_grad()
    def step(self, lr_factor: float = 1.0) -> None:
        """The row optimizer's update of the rows the last forward used, at its learning rate times
        ``lr_factor`` (the schedule's).

        Only those rows and their state are read and written (all rows at sample rate 1).
        """
        if self._active is None or self._active[1].grad is None:
            raise RuntimeError("step() needs a forward and backward pass first")
        rows, active = self._active
        names = self.optimizer.state_names
        if rows is None:
            weight, state = self.weight.data, {name: self.state(name) for name in names}
        else:
            weight, state = active.detach(), {name: self.state(name)[rows] for name in names}
        update_rows(self.optimizer, weight, active.grad, state, self.optimizer.lr * lr_factor)
        if rows is not None:
            self.weight.data.index_copy_(0, rows, weight)
            for name in names:
                self.state(name).index_copy_(0, rows, state[name])
        active.grad = None
        self._active = None

    # -- world-size-independent state ----------------------------------------------------------

    def shard_state(self) -> dict:
        """This rank's rows and their optimizer state under their global row range.

        The states of all ranks together describe the classifier whatever the world size was; any
        world size loads them (``load_shards``).
        """
        tensors = {"weight": self.weight.detach(), **{name: self.state(name) for name in self.optimizer.state_names}}
        return {"num_classes": self.num_classes, "dim": self.dim, "slices": [{"start": self.start, "end": self.end, **tensors}]}

    @torch.no_grad()
    def load_shards(self, states: Iterable[dict], where: str = "classifier state") -> None:
        """Fill this rank's rows from the ``shard_state()`` of every rank of a run of any world size.

        Each slice's tensors only need ``[lo:hi]`` indexing, so views into files that are read
        lazily (safetensors slices) work as well as tensors: a rank reads just the rows it owns.
        """
        filled = torch.zeros(self.local_classes, dtype=torch.bool)
        for state in states:
            if (state["num_classes"], state["dim"]) != (self.num_classes, self.dim):
                raise ModelFormatError(
                    f"{where}: classifier has {state['num_classes']} classes x {state['dim']} dims, "
                    f"this run expects {self.num_classes} x {self.dim}"
                )
            for rows in state["slices"]:
                lo, hi = max(rows["start"], self.start), min(rows["end"], self.end)
                if lo >= hi:
                    continue
                missing = [name for name in self.optimizer.state_names if name not in rows]
                if missing:
                    saved = [name for name in rows if name not in ("start", "end", "weight")]
                    raise ModelFormatError(
                        f"{where}: classifier rows [{rows['start']}, {rows['end']}) have no {', '.join(missing)} "
                        f"state but {', '.join(saved)}: saved with another train.optimizer"
                    )
                source, target = slice(lo - rows["start"], hi - rows["start"]), slice(lo - self.start, hi - self.start)
                self.weight[target] = rows["weight"][source]
                for name in self.optimizer.state_names:
                    self.state(name)[target] = rows[name][source]
                filled[target] = True
        if not filled.all():
            missing = self.start + int(torch.nonzero(~filled)[0])
            raise ModelFormatError(
                f"{where}: classifier slices cover {int(filled.sum())} of rows [{self.start}, {self.end}); "
                f"row {missing} is in none"
            )


# -- memory, for ``reid plan`` --------------------------------------------------------------------


def largest_shard_rows(num_classes: int, world_size: int) -> int:
    """Rows of the largest shard, rank 0's (``shard_range``): the worker that runs out of memory first."""
    start, end = shard_range(num_classes, 0, world_size)
    return end - start


def active_row_count(local_classes: int, sample_rate: float, positives: int) -> int:
    """Rows of a shard one training step uses when the global batch has ``positives`` of its classes:
    all of them at sample rate 1, else those ``ShardedClassifier.sample_rows`` keeps."""
    if sample_rate >= 1.0:
        return local_classes
    # at least one row, so a rank whose classes are all absent still joins the collectives
    return min(local_classes, max(1, int(sample_rate * local_classes), positives))
