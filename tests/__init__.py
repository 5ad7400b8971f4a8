"""The test suite. ``REPO`` is the repository's root, for the tests and the benchmarks."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs/demo.yaml"  # the config most tests and benchmarks start from
