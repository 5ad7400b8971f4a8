"""Collectives of the model-parallel classifier, with its gradient contract inside them.

``gather_global_batch`` is the one autograd-aware collective: forward, every rank's embeddings in
rank order; backward, the sum of every rank's gradient of that global batch, this rank's rows of
it, times the world size. Why the factor: each rank's loss is computed from its own class shard,
so its backward holds only that shard's part of the gradient, and the sum over ranks is the
gradient of the global-batch loss. The backbone that produced the embeddings is data-parallel, and
DDP averages its gradients over ranks; multiplying by the world size here makes that average the
gradient of the global-batch loss, as one process would compute it. No caller scales anything
(insightface's Partial FC keeps the same factor in its gather). All-reduce works on gloo and NCCL
alike (gloo has no reduce-scatter).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherGlobalBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world_size = world()
        ctx.rows, ctx.world_size = slice(rank * tensor.shape[0], (rank + 1) * tensor.shape[0]), world_size
        gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_single(gathered, tensor.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows] * ctx.world_size  # DDP divides the backbone's gradient by the world size


def gather_global_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch, identical on every rank, with the gradient contract described above."""
    _, world_size = world()
    if world_size == 1:
        return embeddings, labels
    all_labels = labels.new_empty((world_size * labels.shape[0], *labels.shape[1:]))
    dist.all_gather_single(all_labels, labels.contiguous())
    return _GatherGlobalBatch.apply(embeddings), all_labels


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
    """In place over the default group; nothing to do in a single process."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op)


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank in rank order when ranks hold different row counts."""
    _, world_size = world()
    if world_size == 1:
        return tensor
    counts = torch.empty(world_size, dtype=torch.int64, device=tensor.device)
    dist.all_gather_single(counts, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(counts.max())
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = tensor.new_empty((world_size * longest, *tensor.shape[1:]))
    dist.all_gather_single(gathered, padded)
    return torch.cat([gathered[r * longest : r * longest + int(counts[r])] for r in range(world_size)])


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Give every rank the mean over ranks of the floating-point buffers (BatchNorm running statistics).

    DDP is built without buffer broadcasting (one collective less per step), so each rank's running
    statistics follow its own batches; evaluation and checkpoints need one model on every rank, and
    the mean of the ranks' statistics describes the whole global batch stream better than any one
    rank's. Integer buffers (batches tracked) are the same on every rank already.
    """
    _, world_size = world()
    if world_size == 1:
        return
    floats = [buffer for buffer in module.buffers() if buffer.dtype.is_floating_point]
    if floats:
        flat = torch.cat([buffer.reshape(-1) for buffer in floats])
        dist.all_reduce(flat)
        flat /= world_size
        for buffer, part in zip(floats, flat.split([buffer.numel() for buffer in floats])):
            buffer.copy_(part.view_as(buffer))
