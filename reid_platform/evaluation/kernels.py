"""The one loop of the ranking engine that array operations do badly, compiled with numba.

For every query row it counts the negatives (gallery images of other identities) that rank before
each of the query's true matches. Done with torch it costs an int64 key per cell, a ``searchsorted``
and a scatter (about 18 ns a cell on this 2-core machine); fused here it is one read of the float32
distance row, a skip for everything after the last true match, and a binary search over the few
match distances otherwise (about 1 ns a cell), with no temporaries.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

# numba's own thread pool, not its OpenMP layer: that one shares libgomp with torch, and its threads
# keep spinning after an evaluation, taking the cores from every training step that follows (2.9x
# slower steps on 2 cores, measured with benchmarks/train_step.py's engine after an evaluation).
numba.config.THREADING_LAYER = "workqueue"


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _count_negatives_before(distance, gallery_ids, query_ids, match_distance, match_index, num_matches, counts, not_a_number):
    for row in numba.prange(distance.shape[0]):
        matches = num_matches[row]
        if matches == 0:
            continue
        own_id = query_ids[row]
        first_d, first_i = match_distance[row, 0], match_index[row, 0]
        last_d, last_i = match_distance[row, matches - 1], match_index[row, matches - 1]
        for column in range(distance.shape[1]):
            value = distance[row, column]
            # Order is (distance, gallery index): ties go to the lower index, as a stable sort.
            if value > last_d or (value == last_d and column > last_i):
                continue  # after the last true match: affects no rank
            if value != value:
                not_a_number[row] += 1  # NaN fails every comparison above, so it always gets here
                continue
            if gallery_ids[column] == own_id:
                continue  # a true match (counted apart) or junk (removed)
            if value < first_d or (value == first_d and column < first_i):
                counts[row, 0] += 1
                continue
            low, high = 1, matches - 1  # the first true match that this negative precedes
            while low < high:
                middle = (low + high) >> 1
                pivot = match_distance[row, middle]
                if value < pivot or (value == pivot and column < match_index[row, middle]):
                    high = middle
                else:
                    low = middle + 1
            counts[row, low] += 1


def negatives_before_matches(
    distance: torch.Tensor,
    gallery_ids: torch.Tensor,
    query_ids: torch.Tensor,
    match_distance: torch.Tensor,
    match_index: torch.Tensor,
    num_matches: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, NaN cells per query): counts[q, k] negatives rank between true matches k-1 and k of q.

    ``match_distance``/``match_index`` hold each query's true matches sorted by (distance, index),
    the first ``num_matches[q]`` entries valid. NaN distances are counted, not ranked, so the caller
    can refuse them at the cost of nothing more than the pass it already makes.
    """
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    counts = np.zeros((distance.shape[0], match_distance.shape[1] + 1), dtype=np.int64)
    not_a_number = np.zeros(distance.shape[0], dtype=np.int64)
    _count_negatives_before(
        distance.contiguous().numpy(),
        gallery_ids.numpy(),
        query_ids.numpy(),
        match_distance.contiguous().numpy(),
        match_index.contiguous().numpy(),
        num_matches.numpy(),
        counts,
        not_a_number,
    )
    return torch.from_numpy(counts), torch.from_numpy(not_a_number)
