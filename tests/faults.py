"""Damage a packed sample in place, as bit rot does: the shard keeps its size, so start-up's size
check passes; DALI's decoder refuses the JPEG while PIL still decodes it leniently."""

from __future__ import annotations

from pathlib import Path

from reid_platform.data.images import decode_problem
from reid_platform.data.manifest import ShardDataset
from reid_platform.data.sample_table import SampleTable
from reid_platform.data.shard_format import OFFSET, SIZE
from reid_platform.input.bad_samples import undecodable


def damage_sample(dataset: ShardDataset, split: str, position: int = 0, lenient_pil: bool = True) -> tuple[str, str]:
    """Zero 8 bytes of the JPEG headers of the ``position``-th sample of ``split``; (tar, key) damaged."""
    table = SampleTable.read(dataset, split)
    tar, key = table.tars[table.shard[position]], table.key(position)
    offset, size = int(table.rows[position, OFFSET]), int(table.rows[position, SIZE])
    data = bytearray(Path(tar).read_bytes())
    jpeg = bytes(data[offset : offset + size])
    for start in range(2, min(size - 8, 800)):
        damaged = jpeg[:start] + bytes(8) + jpeg[start + 8 :]
        if undecodable([damaged])[0] and (decode_problem(damaged) == "") == lenient_pil:
            data[offset : offset + size] = damaged
            Path(tar).write_bytes(bytes(data))
            return tar, key
    raise AssertionError(f"no 8-byte window of {key}'s headers makes DALI refuse it")
