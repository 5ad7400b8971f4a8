"""The sharded classifier's checkpoint files: ``ShardedClassifier.shard_state()``s on disk.

One directory holds one safetensors file per slice of rows, named by its global row range, and the
classifier's layout (classes and dimensions). Every rank of a run writes its own slices; any world
size reads them back, each rank only the rows it owns (``saved_shards`` opens the files lazily).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from reid_platform.errors import ModelFormatError

SHARD_FILE = "rows-{start:012d}-{end:012d}.safetensors"
ROWS_NAME = re.compile(r"rows-(\d{12})-(\d{12})\.safetensors")
LAYOUT_FILE = "classifier.json"


def write_shards(states: Iterable[dict], directory: Path) -> None:
    """Write ``shard_state()``s, one safetensors file per slice named by its global row range."""
    directory.mkdir(parents=True, exist_ok=True)
    for state in states:
        for rows in state["slices"]:
            tensors = {name: tensor.contiguous().cpu() for name, tensor in rows.items() if name not in ("start", "end")}
            save_file(tensors, directory / SHARD_FILE.format(start=rows["start"], end=rows["end"]))
        # every rank writes the same layout into its copy of the checkpoint
        (directory / LAYOUT_FILE).write_text(json.dumps({"num_classes": state["num_classes"], "dim": state["dim"]}))


@contextmanager
def saved_shards(directory: Path) -> Iterator[list[dict]]:
    """The shard states ``write_shards`` left in ``directory`` (by every rank of a run), their
    tensors read lazily while the context is open: pass them to ``load_shards``."""
    try:
        layout = json.loads((directory / LAYOUT_FILE).read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{directory}: not a classifier checkpoint (no {LAYOUT_FILE})") from None
    with ExitStack() as files:
        slices = []
        for path in sorted(directory.glob("rows-*.safetensors")):
            match = ROWS_NAME.fullmatch(path.name)
            if match is None:
                raise ModelFormatError(f"{path}: not a classifier slice name ({SHARD_FILE})")
            opened = files.enter_context(safe_open(path, framework="pt"))
            start, end = int(match.group(1)), int(match.group(2))
            slices.append({"start": start, "end": end, **{name: opened.get_slice(name) for name in opened.keys()}})
        yield [{**layout, "slices": slices}]
