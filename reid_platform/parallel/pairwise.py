"""Pair-wise losses over the global batch: Circle for pair-wise labels, and batch-hard triplet.

Every rank holds the gathered global batch (``comm.gather_global_batch``) and computes the terms of
its own samples as anchors, against every sample of every rank, so that pairs span workers. The
loss of the global batch is the mean over its valid anchors, the sum of every rank's share; a
rank's share is the sum of its anchors' terms divided by the number of valid anchors of the whole
batch (which every rank counts from the gathered labels). The gather's backward sums the shares'
gradients over ranks, so each rank's gradients are those of the dense single-process loss on the
global batch.

Both losses work on L2-normalised embeddings. For an anchor with positives P (same identity, the
anchor itself excluded) and negatives N:

    circle   (Sun et al. 2020, eq. 1 with eq. 4's weights, a_p and a_n constants for back-propagation)
             softplus( logsumexp_N(gamma a_n (s_n - m)) + logsumexp_P(-gamma a_p (s_p - 1 + m)) ),
             a_p = relu(1 + m - s_p), a_n = relu(s_n + m), s the cosine similarity
    triplet  (Hermans et al. 2017, batch hard) relu(max_P d_ap - min_N d_an + margin), or with the
             soft margin softplus(max_P d_ap - min_N d_an); d the Euclidean distance

An anchor without a positive or without a negative in the batch is not valid and adds nothing
(the identity sampler gives every anchor K - 1 positives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reid_platform.parallel.config import PairwiseConfig
from reid_platform.parallel.losses import compute_dtype


def pairwise_share(
    embeddings: torch.Tensor, labels: torch.Tensor, anchors: slice, cfg: PairwiseConfig
) -> torch.Tensor:
    """This rank's share of the pair-wise loss of the global batch (``embeddings``, ``labels``),
    for its own samples ``anchors`` (rows of the global batch)."""
    unit = F.normalize(embeddings.to(compute_dtype(embeddings)), dim=1)
    own = torch.arange(embeddings.shape[0], device=embeddings.device)[anchors]
    same = labels[own, None] == labels[None, :]
    positive = same.clone()
    positive[torch.arange(len(own)), own] = False  # an anchor is not its own positive
    negative = ~same
    valid = positive.any(1) & negative.any(1)
    # an invalid anchor computes on every column (all finite, so no NaN reaches the gradient), then drops out
    positive, negative = positive | ~valid[:, None], negative | ~valid[:, None]
    similarity = unit[anchors] @ unit.t()
    if cfg.name == "circle":
        terms = _circle(similarity, positive, negative, cfg.scale, cfg.margin)
    else:
        distance = (2.0 - 2.0 * similarity).clamp_min(1e-12).sqrt()
        terms = _batch_hard_triplet(distance, positive, negative, cfg.margin, cfg.soft)
    every_same = labels[:, None] == labels[None, :]
    valid_anchors = ((every_same.sum(1) > 1) & (~every_same).any(1)).sum().clamp_min(1)
    return torch.where(valid, terms, 0.0).sum() / valid_anchors


def _circle(similarity, positive, negative, gamma: float, m: float) -> torch.Tensor:
    a_p = (1.0 + m - similarity.detach()).clamp_min(0.0)
    a_n = (similarity.detach() + m).clamp_min(0.0)
    # masked with -inf, not zeros: a masked zero would still enter the log-sum-exp
    logit_p = torch.where(positive, -gamma * a_p * (similarity - (1.0 - m)), float("-inf"))
    logit_n = torch.where(negative, gamma * a_n * (similarity - m), float("-inf"))
    return F.softplus(torch.logsumexp(logit_p, dim=1) + torch.logsumexp(logit_n, dim=1))


def _batch_hard_triplet(distance, positive, negative, margin: float, soft: bool) -> torch.Tensor:
    hardest_positive = torch.where(positive, distance, float("-inf")).max(dim=1).values
    hardest_negative = torch.where(negative, distance, float("inf")).min(dim=1).values
    gap = hardest_positive - hardest_negative
    return F.softplus(gap) if soft else F.relu(gap + margin)
