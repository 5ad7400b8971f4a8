"""Samples that stop decoding during a run: found, named, then skipped or fatal (``data.on_bad_sample``).

At millions of images, bit rot and half-copied shards happen during week-long runs, and a damaged
JPEG of the same size passes start-up's size check. DALI's error names only its operator, so after
a decoding failure the shards are searched for the samples that DALI's own decoding library
(nvImageCodec, on the CPU) refuses; PIL decodes many damaged JPEGs leniently and would find nothing.
First the shards whose sha256 is no longer the packed one are searched, all of the split's shards
only when none changed; the search costs one decode of the searched shards. (It decodes outside a
DALI pipeline: a pipeline that failed is not reusable, and building one per failed batch crashed
DALI 2.4 now and then.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from reid_platform.data.manifest import ShardDataset
from reid_platform.data.sample_table import SampleTable
from reid_platform.data.shard_format import SAMPLE_INDEX

CHECK_BATCH = 256


@dataclass(frozen=True)
class BadSample:
    tar: str
    key: str
    index: int  # the sample's dataset index in its split
    reason: str

    def __str__(self) -> str:
        return f"{self.tar}: sample {self.key} does not decode ({self.reason})"


def is_decode_failure(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "decoders" in str(error)


def error_summary(error: BaseException) -> str:
    """DALI's multi-line error as one line: what its operator encountered, without the stack."""
    text = str(error)
    cause = text.split("encountered:", 1)[-1]  # after the operator's name and where it was defined
    lines = [line.strip() for line in cause.splitlines() if line.strip() and not line.startswith("  ")]
    return " ".join(line for line in lines if not line.startswith(("Current pipeline object", "Critical error")))[:300]


def suspect_shards(dataset: ShardDataset, split: str) -> list[int] | None:
    """The shards of ``split`` to search after a decoding failure: those whose sha256 changed, or all
    (None) when none did."""
    return [number for _, number in dataset.changed_shards((split,))] or None


def find_bad_samples(
    dataset: ShardDataset, split: str, shards: list[int] | None = None, known: Iterable[int] = ()
) -> list[BadSample]:
    """Every sample of ``split`` (of its shards numbered ``shards``; None: all) that DALI's CPU decoder
    refuses, but those whose indices are ``known``."""
    table = SampleTable.read(dataset, split, shards)
    return _bad(table, np.flatnonzero(~np.isin(table.rows[:, SAMPLE_INDEX], np.fromiter(known, np.int64))))


def _bad(table: SampleTable, positions: np.ndarray) -> list[BadSample]:
    return [
        BadSample(table.tars[table.shard[i]], table.key(i), int(table.rows[i, SAMPLE_INDEX]), reason)
        for i, reason in _refused(table.reader(), np.unique(positions))
    ]


def _refused(read, positions: np.ndarray) -> list[tuple[int, str]]:
    """(position, reason) of the samples in ``positions`` that do not decode, a batch at a time."""
    found, decoder = [], _decoder()
    for start in range(0, len(positions), CHECK_BATCH):
        batch = positions[start : start + CHECK_BATCH]
        refused = undecodable([encoded.tobytes() for encoded in read(batch)], decoder)
        found += [(int(i), "nvImageCodec, DALI's decoder, refuses it") for i, bad in zip(batch, refused) if bad]
    return found


def undecodable(encoded: list[bytes], decoder=None) -> list[bool]:
    """Which of the images nvImageCodec (the library DALI decodes with) refuses, on the CPU."""
    decoder = decoder or _decoder()
    try:
        return [image is None for image in decoder.decode(encoded)]
    except RuntimeError:  # the batch as a whole refused (e.g. an empty member): one image at a time
        return [len(encoded) == 1 or undecodable([image], decoder)[0] for image in encoded]


def _decoder():
    from nvidia import nvimgcodec  # it returns None for an image it refuses, where DALI raises

    return nvimgcodec.Decoder(
        device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)]
    )


def among(table: SampleTable, positions: np.ndarray, known: Iterable[int] = ()) -> list[BadSample]:
    """The samples at ``positions`` of ``table`` (those in flight when decoding failed) that do not decode."""
    return _bad(table, positions[~np.isin(table.rows[positions, SAMPLE_INDEX], np.fromiter(known, np.int64))])


def search(dataset: ShardDataset, split: str, known: Iterable[int] = ()) -> list[BadSample]:
    """The samples of ``split`` to blame for a decoding failure: in the shards whose sha256 changed
    and, when they hold no new one, in all of the split's shards."""
    suspects = suspect_shards(dataset, split)
    found = find_bad_samples(dataset, split, suspects, known)
    return found if found or suspects is None else find_bad_samples(dataset, split, None, known)
