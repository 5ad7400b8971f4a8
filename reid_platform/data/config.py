"""The ``data`` section: which packed dataset a run reads."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from reid_platform.section import Section


class DataConfig(Section):
    shards: Path = Field(description="Directory written by `reid data pack` (holds manifest.json).")
