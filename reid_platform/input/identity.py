"""Identity-balanced batches: P identities x K images each, read from the shards by offset.

Pair-wise losses need several images of each identity in a batch, and the few-identities-per-batch
recipe helps Circle loss too. A shuffled stream of shards cannot promise that, so this sampler reads
samples directly: the sample table of every shard (``data/sample_table.py``) gives each sample's
label and byte offset and size in its tar, so a batch is P*K seeks into the shards (local disk or a shared filesystem alike), fed to the usual
DALI graph through an external source. Every rank draws with its own seed from the whole training
set; identities with fewer than K images are drawn with replacement.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np

from reid_platform.data.sample_table import SampleTable
from reid_platform.errors import DatasetError


def identity_batches(labels: np.ndarray, identities: int, images: int, seed: int) -> Iterator[np.ndarray]:
    """Endless arrays of P*K positions in ``labels``: ``identities`` distinct labels, ``images`` samples each.

    Samples are grouped by label once (a sort, not a pass per label: a million identities start in
    a second), and each batch costs P draws whatever the number of identities.
    """
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    if len(starts) < identities:
        raise DatasetError(
            f"{len(starts)} training identities cannot fill batches of {identities} identities; "
            "lower input.batch_size or raise input.images_per_identity"
        )
    rng = np.random.default_rng(seed)
    while True:
        chosen = rng.choice(len(starts), size=identities, replace=False)
        yield np.concatenate(
            [order[starts[c] + rng.choice(counts[c], size=images, replace=counts[c] < images)] for c in chosen]
        )


def identity_source(
    table: SampleTable, identities: int, images: int, seed: int, excluded: np.ndarray | None = None,
    recent: deque | None = None,
):  # fmt: skip
    """A DALI external-source callable: each call returns one P x K batch (JPEG bytes, meta rows).

    ``excluded`` are table positions never drawn (samples found not to decode); each batch's positions
    are appended to ``recent`` (the batches DALI may be decoding, where a decoding failure lies).
    """
    usable = np.arange(len(table.rows)) if excluded is None else np.setdiff1d(np.arange(len(table.rows)), excluded)
    batches, read = identity_batches(table.labels[usable], identities, images, seed), table.reader()

    def next_batch():
        positions = usable[next(batches)]
        if recent is not None:
            recent.append(positions)
        return read(positions), list(table.meta[positions])

    return next_batch
