"""Autograd-aware collectives for the sharded classifier.

torch.distributed.nn.functional.all_gather is deprecated (torch 2.14) in favour of private
functional collectives, so the one collective we need is spelled out here: gather forward, and in
backward sum every rank's gradient of the gathered batch and keep this rank's rows. All-reduce works
on gloo and NCCL alike (gloo has no reduce-scatter).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        ctx.rows = slice(rank * tensor.shape[0], (rank + 1) * tensor.shape[0])
        gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_single(gathered, tensor.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized ``tensor`` from every rank (rank order); gradients reach the owner."""
    return _AllGather.apply(tensor)


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank in rank order when ranks hold different row counts."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world_size = dist.get_world_size()
    counts = torch.empty(world_size, dtype=torch.int64, device=tensor.device)
    dist.all_gather_single(counts, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(counts.max())
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = tensor.new_empty((world_size * longest, *tensor.shape[1:]))
    dist.all_gather_single(gathered, padded)
    return torch.cat([gathered[r * longest : r * longest + int(counts[r])] for r in range(world_size)])


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, source: int = 0) -> None:
    """Give every rank ``source``'s buffers (BatchNorm running statistics).

    DDP syncs buffers only before training forwards, so after the last step each rank holds the
    statistics of its own last batch; evaluation and checkpoints must all use the same ones.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, source)


def undo_ddp_averaging(embeddings: torch.Tensor) -> None:
    """Scale the embedding gradient by the world size before it reaches the DDP backbone.

    The sharded classifier's loss on every rank is already the loss of the whole global batch, so
    the gradient each rank computes for its own embeddings is complete; DDP's averaging of backbone
    gradients over ranks would divide it by the world size once too often.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world_size = dist.get_world_size()
        embeddings.register_hook(lambda grad: grad * world_size)
