"""Class-level margin losses (Circle, CosFace, ArcFace, normalised softmax), written to shard over classes.

Every loss here is softmax cross-entropy on per-class logits that depend only on the cosine between
an embedding and a class weight. Sun et al. (CVPR 2020) write the class-level Circle loss as

    L = log(1 + sum_j exp(gamma a_n^j (s_n^j - m)) exp(-gamma a_p (s_p - 1 + m)))
    a_p = relu(1 + m - s_p),  a_n^j = relu(s_n^j + m)   (constants for back-propagation)

which is cross-entropy on the Circle logits below. Cross-entropy needs only a row maximum, a row sum
of exponentials and the positive logit, each a max or sum over classes, so the classes can live on
different workers and be visited in chunks (``sharded_margin_loss``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from reid_platform.parallel.comm import all_reduce
from reid_platform.parallel.config import LossConfig


def margin_logits(cosine: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Per-class logits for a (rows x classes) cosine matrix.

    ``target[i]`` is the column of row i's own class, or -1 when that class is not among these columns
    (another shard or chunk owns it).
    """
    s, m = cfg.scale, cfg.margin
    if cfg.name == "circle":
        logits = s * (cosine.detach() + m).clamp_min(0.0) * (cosine - m)
    else:
        logits = s * cosine
    rows = torch.nonzero(target >= 0).squeeze(1)
    if rows.numel() == 0 or cfg.name == "softmax":
        return logits
    cols = target[rows]
    positive = cosine[rows, cols]
    if cfg.name == "circle":
        value = s * (1.0 + m - positive.detach()).clamp_min(0.0) * (positive - (1.0 - m))
    elif cfg.name == "cosface":
        value = s * (positive - m)
    else:  # arcface: cos(theta + m) while theta + m <= pi, where it still falls as theta grows;
        # beyond, the CosFace-like cos(theta) - m sin(m) keeps the logit monotonic (InsightFace's form)
        theta = torch.acos(positive.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        value = s * torch.where(
            positive > math.cos(math.pi - m), torch.cos(theta + m), positive - m * math.sin(m)
        )
    return logits.index_put((rows, cols), value)


class _ShardedMarginLoss(torch.autograd.Function):
    """Mean cross-entropy over classes split across ranks (and, within a rank, visited in chunks).

    Every rank holds the same rows (the global batch) and a disjoint slice of class weights. Forward
    fills one (rows x local classes) logit buffer chunk by chunk, then turns it into softmax
    probabilities in place; backward recomputes each chunk's cosines to push (softmax - target)
    through the margin, the cosine and the normalisations. Nothing of size (rows x all classes)
    exists, and the only other per-class tensors are one chunk's temporaries.

    Label smoothing (epsilon) makes the target (1 - epsilon) on the true class and epsilon / C on
    every class, C the classes in play (all of them, or the sampled ones):

        L = logsumexp(z) - (1 - epsilon) z_y - (epsilon / C) sum_j z_j

    The sum over classes and C are spread over the ranks like the sum of exponentials, and go into
    the same all-reduce.
    """

    @staticmethod
    def forward(ctx, embeddings, weight, target, cfg: LossConfig, chunk_size: int):
        dtype = compute_dtype(embeddings, weight)
        x = F.normalize(embeddings.detach().to(dtype), dim=1)
        logits = x.new_empty((x.shape[0], weight.shape[0]))
        for start in range(0, weight.shape[0], chunk_size):
            block = slice(start, start + chunk_size)
            cosine, _, _ = _cosines(x, weight[block], dtype)
            logits[:, block] = margin_logits(cosine, columns_in_range(target, start, cosine.shape[1]), cfg)
        row_max = logits.max(dim=1).values
        all_reduce(row_max, dist.ReduceOp.MAX)
        rows = torch.nonzero(target >= 0).squeeze(1)
        positive = torch.zeros_like(row_max)
        positive[rows] = logits[rows, target[rows]]
        smoothing = cfg.label_smoothing
        logit_sum = logits.sum(dim=1) if smoothing else torch.zeros_like(row_max)
        probabilities = logits.sub_(row_max[:, None]).exp_()  # the buffer is reused from here on
        classes = torch.full_like(row_max, float(weight.shape[0]))  # every entry the same: this rank's classes
        sums = torch.stack([probabilities.sum(dim=1), positive, logit_sum, classes])
        all_reduce(sums)  # one collective for every sum over the class shards
        sum_exp, positive, logit_sum, classes = sums
        probabilities.div_(sum_exp[:, None])
        ctx.save_for_backward(embeddings, weight, target, probabilities)
        ctx.cfg, ctx.chunk_size, ctx.classes = cfg, chunk_size, float(classes[0]) if len(classes) else 1.0
        # max + log(sum exp) - positive: exact even for gamma = 256, where -log(p) would underflow.
        loss = row_max + sum_exp.log() - (1.0 - smoothing) * positive
        if smoothing:
            loss = loss - smoothing / classes * logit_sum
        return loss.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        embeddings, weight, target, probabilities = ctx.saved_tensors
        rows = torch.nonzero(target >= 0).squeeze(1)
        grad_logits = probabilities  # reused in place: the forward's probabilities are not needed again
        smoothing = ctx.cfg.label_smoothing
        grad_logits[rows, target[rows]] -= 1.0 - smoothing
        if smoothing:
            grad_logits.sub_(smoothing / ctx.classes)
        grad_logits.mul_(grad_loss / grad_logits.shape[0])
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        dtype = compute_dtype(embeddings, weight)
        with torch.enable_grad():
            x_leaf = embeddings.detach().to(dtype).requires_grad_(True)
            x_unit = F.normalize(x_leaf, dim=1)
        x = x_unit.detach()
        grad_x = torch.zeros_like(x)
        for start in range(0, weight.shape[0], ctx.chunk_size):
            block = slice(start, start + ctx.chunk_size)
            cosine, w, inverse_norm = _cosines(x, weight[block], dtype)
            with torch.enable_grad():  # autograd for the margin only: elementwise on (batch x chunk)
                cosine_leaf = cosine.requires_grad_(True)
                logits = margin_logits(cosine_leaf, columns_in_range(target, start, cosine.shape[1]), ctx.cfg)
                (grad_cosine,) = torch.autograd.grad(logits, cosine_leaf, grad_logits[:, block])
            # cosine_ij = x_i . w_j / |w_j|: d/dx_i = w_j / |w_j|, d/dw_j = (x_i - cosine_ij w_j / |w_j|) / |w_j|
            grad_scaled = grad_cosine * inverse_norm
            grad_x.addmm_(grad_scaled, w)
            if grad_weight is not None:
                radial = (grad_cosine * cosine).sum(dim=0).mul_(inverse_norm.square())
                grad_weight[block] = (grad_scaled.t() @ x).addcmul_(w, radial[:, None], value=-1.0)
        (grad_embeddings,) = torch.autograd.grad(x_unit, x_leaf, grad_x)  # through the features' normalisation
        return grad_embeddings.to(embeddings.dtype), grad_weight, None, None, None


def _cosines(
    x: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cosines of the unit features ``x`` with ``rows``, the rows in ``dtype``, their inverse norms).

    The (batch x chunk) products are divided by the rows' norms instead of normalising the
    (chunk x d) rows: the batch is much smaller than d, so this saves a copy of the rows and the
    passes over it (and, in backward, those of the normalisation's gradient).
    """
    w = rows.detach().to(dtype)
    inverse_norm = torch.linalg.vector_norm(w, dim=1).clamp_min(1e-12).reciprocal()  # F.normalize's eps
    return (x @ w.t()).mul_(inverse_norm), w, inverse_norm


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 at least (fp16/bf16 activations under AMP), float64 when an input is float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def columns_in_range(labels: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """Column of each label among classes [start, start + width); -1 for others (and for -1)."""
    local = labels - start
    return torch.where((labels >= 0) & (local >= 0) & (local < width), local, -1)


def default_chunk_size(rows: int, dim: int, budget_bytes: int = 4 * 1024**2) -> int:
    """Classes per chunk so that each float32 temporary, (rows x chunk) cosines or (chunk x dim)
    normalised weights and their gradients, stays within the budget."""
    return max(256, budget_bytes // (4 * max(rows, dim, 1)))


def sharded_margin_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    cfg: LossConfig,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean margin-softmax loss of ``embeddings`` (the global batch) against this rank's ``weight`` rows.

    ``target`` is each row's column in ``weight`` or -1 where another rank owns the class. Without an
    initialised process group this is the plain single-process loss. Computed in float32 at least.
    """
    chunk = chunk_size or default_chunk_size(*embeddings.shape)
    return _ShardedMarginLoss.apply(embeddings, weight, target, cfg, chunk)


# -- memory, for ``reid plan`` --------------------------------------------------------------------

# Temporaries alive at once in backward's recomputation of one chunk: of size (rows x chunk), the
# cosines, Circle's two factors, the margin logits and the gradients of two of them (Circle has the
# most, the other losses fewer); of size (chunk x d) and (rows x d), the chunk's rows' gradient
# before it is stored (``_cosines`` normalises no copy of the rows) and the features' gradient.
CHUNK_LOGIT_TEMPORARIES = 6
CHUNK_ROW_TEMPORARIES = 1
FLOAT32 = torch.float32.itemsize  # the loss computes in float32 at least (``compute_dtype``)


def chunk_classes(rows: int, classes: int, dim: int) -> int:
    """Classes ``sharded_margin_loss`` visits at a time, of ``classes``, for ``rows`` features of ``dim``."""
    return min(classes, default_chunk_size(rows, dim))


def logit_bytes(rows: int, classes: int) -> int:
    """The (rows x classes) logit buffer forward fills and backward reuses for the gradient."""
    return rows * classes * FLOAT32


def chunk_bytes(rows: int, classes: int, dim: int) -> int:
    """The temporaries of one chunk's recomputation in backward."""
    chunk = chunk_classes(rows, classes, dim)
    return (CHUNK_LOGIT_TEMPORARIES * rows * chunk + CHUNK_ROW_TEMPORARIES * (chunk + rows) * dim) * FLOAT32
