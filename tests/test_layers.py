"""No package imports from one above it (``tests/layers.py`` holds the order): read from the source,
inside functions too, and by importing each layer in turn with every layer above it blocked."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests import REPO
from tests.layers import Import, imports, modules, room, unplaced

# Imports each layer's modules, lowest layer first, while a finder refuses every module of a higher
# layer (a package's bare __init__ passes: Python loads it on the way to the package's config module).
IMPORT_IN_ORDER = """
import importlib, sys
from tests.layers import LAYERS, RANK, modules, room

class AboveBlocked:
    level = 0

    def find_spec(self, name, path=None, target=None):
        if name.startswith("reid_platform.") and name.count(".") > 1 and RANK[room(name)] > self.level:
            raise ImportError(f"{name} is in a layer above {LAYERS[self.level]}")
        return None

blocker = AboveBlocked()
sys.meta_path.insert(0, blocker)
for level in range(len(LAYERS)):
    blocker.level = level
    for module in modules():
        if module.count(".") and RANK[room(module)] == level:
            try:
                importlib.import_module(module)
            except ImportError as error:
                sys.exit(f"{module}: {error}")
"""


def test_the_engine_imports_without_ray_or_mlflow():
    """train/ is the Ray-free engine: the run wing above it is where Ray and MLflow come in."""
    engine = [module for module in modules() if room(module) == "train"]
    code = "import sys; sys.modules['ray'] = sys.modules['mlflow'] = None\n" + "".join(f"import {m}\n" for m in engine)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reid_platform.train.engine" in engine
    # nor inside a function, where importing the module does not reach
    lazy = [
        f"{module}:{node.lineno}" for module, path in modules().items() if room(module) == "train"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and {name.split(".")[0] for name in _imported(node)} & {"ray", "mlflow"}
    ]  # fmt: skip
    assert lazy == []


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    return [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]


def test_every_package_has_a_place_in_the_order():
    assert unplaced() == set()


def test_no_import_runs_upwards():
    upward = [f"{found.source}:{found.line} imports {found.target}" for found in imports() if found.upward]
    assert upward == []


def test_an_upward_import_is_found():
    assert Import("reid_platform.data.pack", 1, "reid_platform.train.engine").upward
    assert not Import("reid_platform.train.engine", 1, "reid_platform.data.pack").upward
    assert not Import("reid_platform.train.engine", 1, "reid_platform.config").upward  # the run config
    assert not Import("reid_platform.cli.config", 1, "reid_platform.cli.common").upward  # a command, no section


def test_each_layer_imports_with_the_layers_above_blocked():
    result = subprocess.run([sys.executable, "-c", IMPORT_IN_ORDER], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
