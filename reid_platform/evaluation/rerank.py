"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in memory that does not grow as query x gallery.

The reference implementation builds the dense (Q+G)^2 distance matrix, its full argsort and a dense
encoding matrix V. Here every step keeps only what it needs:

1. one pass over blocks of rows of the (Q+G)^2 squared Euclidean distances keeps each item's k1+1
   nearest neighbours (``topk``) and its largest distance (the row normaliser), then drops the block;
2. k-reciprocal sets and their expansion are computed from the neighbour lists alone;
3. V (each item's weights over its expanded set) and its local query expansion are sparse;
4. the Jaccard distance of a block of queries to the gallery sums ``min(V_q, V_g)`` over the shared
   non-zeros only, through an inverted (column) index of the gallery's rows of V.

``RerankedDistances`` answers the ranking engine's ``Distances`` call with
``(1 - lambda) * jaccard + lambda * normalised original distance`` for a block of query rows.
Features are compared with squared Euclidean distance, as in the paper (after L2 normalisation when
the metric is cosine).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch

from reid_platform.evaluation.config import EvaluationConfig
from reid_platform.evaluation.distance import check_magnitude, squared_euclidean, squared_norms

# per query x gallery cell of a Jaccard sub-block: float64 sums from bincount + float32 temporaries
JACCARD_BYTES_PER_CELL = 20
# per shared non-zero pair: its entry, row, gallery position, minimum and cell index
JACCARD_BYTES_PER_PAIR = 48


def _row_blocks(total: int, bytes_per_row: int, memory_mb: float):
    step = max(1, int(memory_mb * 2**20 // max(bytes_per_row, 1)))
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


class RerankedDistances:
    """Re-ranked distances with ``cfg``'s rerank_k1, rerank_k2 and rerank_lambda, within ``cfg.memory_mb``."""

    def __init__(self, query: torch.Tensor, gallery: torch.Tensor, cfg: EvaluationConfig = EvaluationConfig()):
        self.lambda_value, self.memory_mb = cfg.rerank_lambda, cfg.memory_mb
        self.num_query, self.num_gallery = query.shape[0], gallery.shape[0]
        self.features = torch.cat([query, gallery]).float()
        self.norms = squared_norms(self.features)
        check_magnitude("query and gallery", self.norms, "euclidean")
        total = len(self.features)
        self.neighbours, self.row_max = self._nearest(min(cfg.rerank_k1 + 1, total))
        encoding = self._encoding(min(round(cfg.rerank_k1 / 2) + 1, total))
        if cfg.rerank_k2 != 1:
            encoding = self._expand(encoding, min(cfg.rerank_k2, total))
        self.query_encoding = encoding[: self.num_query].tocsr()
        self.gallery_by_column = encoding[self.num_query :].tocsc()
        self.column_sizes = np.diff(self.gallery_by_column.indptr)

    def _distance(self, rows: slice, columns: slice = slice(None)) -> torch.Tensor:
        return squared_euclidean(self.features[rows], self.features[columns], self.norms[rows], self.norms[columns])

    def _nearest(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        total = len(self.features)
        neighbours = torch.empty(total, k, dtype=torch.int64)
        row_max = torch.empty(total)
        for rows in _row_blocks(total, 12 * total, self.memory_mb):
            distance = self._distance(rows)
            row_max[rows] = distance.max(1).values
            neighbours[rows] = distance.topk(k, dim=1, largest=False, sorted=True).indices
        return neighbours, row_max

    def _reciprocal(self, k: int) -> torch.Tensor:
        """mask[i, j]: item i is also among the k nearest of its j-th nearest neighbour."""
        nearest = self.neighbours[:, :k]
        mask = torch.empty(nearest.shape, dtype=torch.bool)
        for rows in _row_blocks(len(nearest), 9 * k * k, self.memory_mb):
            items = torch.arange(rows.start, rows.stop)
            mask[rows] = (nearest[nearest[rows]] == items[:, None, None]).any(2)
        return mask

    def _encoding(self, half: int) -> scipy.sparse.csr_matrix:
        """V: each item's exp(-distance) weights over its expanded k-reciprocal set, rows summing to 1."""
        k = self.neighbours.shape[1]
        reciprocal, half_reciprocal = self._reciprocal(k), self._reciprocal(half)
        half_sets = torch.where(half_reciprocal, self.neighbours[:, :half], -2)
        row_parts, column_parts, value_parts = [], [], []
        dim = self.features.shape[1]
        for rows in _row_blocks(len(self.features), k * half * (k + 4 * dim) * 2, self.memory_mb):
            candidates = self.neighbours[rows]
            own_set = torch.where(reciprocal[rows], candidates, -1)  # R(i, k1)
            their_sets = half_sets[candidates]  # R(j, k1/2) of each neighbour j
            overlap = (their_sets[..., None] == own_set[:, None, None, :]).any(-1).sum(-1)
            size = half_reciprocal[candidates].sum(-1)
            expands = reciprocal[rows] & (overlap * 3 > size * 2)  # |R(j) & R(i)| > 2/3 |R(j)|
            members = torch.cat([own_set, torch.where(expands[..., None], their_sets, -1).flatten(1)], dim=1)
            members = members.sort(dim=1).values
            repeated = torch.zeros_like(members, dtype=torch.bool)
            repeated[:, 1:] = members[:, 1:] == members[:, :-1]
            keep = (members >= 0) & ~repeated
            safe = members.clamp_min(0)
            items = torch.arange(rows.start, rows.stop)
            inner = torch.einsum("cd,cld->cl", self.features[rows], self.features[safe])
            distance = self.norms[rows, None] + self.norms[safe] - 2 * inner
            weight = torch.where(keep, torch.exp(-distance / self.row_max[rows, None]), 0.0)
            weight = weight / weight.sum(1, keepdim=True)
            row, column = torch.nonzero(keep, as_tuple=True)
            row_parts.append(items[row].numpy())
            column_parts.append(members[row, column].numpy())
            value_parts.append(weight[row, column].numpy())
        total = len(self.features)
        return scipy.sparse.csr_matrix(
            (np.concatenate(value_parts), (np.concatenate(row_parts), np.concatenate(column_parts))), shape=(total, total)
        )

    def _expand(self, encoding: scipy.sparse.csr_matrix, k2: int) -> scipy.sparse.csr_matrix:
        """Local query expansion: each row of V becomes the mean of its k2 nearest items' rows."""
        total = len(self.features)
        rows = np.repeat(np.arange(total), k2)
        columns = self.neighbours[:, :k2].reshape(-1).numpy()
        average = scipy.sparse.csr_matrix((np.full(len(rows), 1.0 / k2, np.float32), (rows, columns)), shape=(total, total))
        return (average @ encoding).tocsr()

    def _shared_minimum(self, rows: slice) -> torch.Tensor:
        """sum_l min(V[q, l], V[g, l]) for the queries ``rows`` and every gallery item g."""
        block = self.query_encoding[rows]
        entry_rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        lengths = self.column_sizes[block.indices]
        starts = self.gallery_by_column.indptr[block.indices]
        pairs = int(lengths.sum())
        owner = np.repeat(np.arange(len(lengths)), lengths)
        position = np.arange(pairs) - np.repeat(np.cumsum(lengths) - lengths, lengths) + starts[owner]
        shared = np.minimum(block.data[owner], self.gallery_by_column.data[position])
        cell = entry_rows[owner].astype(np.int64) * self.num_gallery + self.gallery_by_column.indices[position]
        total = np.bincount(cell, weights=shared, minlength=block.shape[0] * self.num_gallery)
        return torch.from_numpy(total.reshape(block.shape[0], self.num_gallery)).float()

    def _sub_blocks(self, start: int, stop: int):
        """Query rows in pieces whose Jaccard temporaries (cells and shared pairs) fit the budget."""
        budget = self.memory_mb * 2**20
        pairs = np.cumsum((self.query_encoding[start:stop] != 0).astype(np.int64) @ self.column_sizes)
        most_rows = max(1, int(budget // (JACCARD_BYTES_PER_CELL * self.num_gallery)))
        first = start
        while first < stop:
            done = pairs[first - start - 1] if first > start else 0
            fitting = int(np.searchsorted(pairs, done + budget // JACCARD_BYTES_PER_PAIR, side="right")) + start
            last = min(stop, first + most_rows, max(first + 1, fitting))
            yield slice(first, last)
            first = last

    def __call__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.num_query)
        final = torch.empty(stop - start, self.num_gallery)
        lam = self.lambda_value
        gallery = slice(self.num_query, None)
        for part in self._sub_blocks(start, stop):
            shared = self._shared_minimum(part)
            jaccard = shared.div_(shared.neg().add_(2)).neg_().add_(1)  # 1 - s / (2 - s)
            original = self._distance(part, gallery).div_(self.row_max[part, None])
            final[part.start - start : part.stop - start] = jaccard.mul_(1 - lam).add_(original, alpha=lam)
        return final
