"""The intended order of the packages, and every import between them checked against it.

    python -m tests.layers        prints the order and each package's imports of the others; exit
                                  status 1 when one runs upwards

A module may import from its own package and from any package below it, never from one above. The
one exception is a component's typed config: the modules ``reid_platform/config.py`` (the run
config) assembles its sections from sit in the configs layer with it, just above the foundation;
so the engine reads the run config though its ``scaling`` and ``run`` sections are the run wing's.
Imports inside functions count as much as those at the top, relative ones as their absolute names.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

from tests import REPO

PACKAGE = "reid_platform"
# lowest first; each entry is one layer
LAYERS: tuple[tuple[str, ...], ...] = (
    (PACKAGE, "errors", "section", "redaction", "console"),  # the foundation: the root package's modules
    ("storage",),  # where files live: the location type, local and object-store file operations
    ("configs",),  # config.py, the run config, and the component configs it assembles (CONFIGS)
    ("data",),  # the packed shard format, packing, the opened dataset
    ("model",),  # backbones, their preprocessing, the model format
    ("parallel",),  # the sharded classifier, its losses, collectives
    ("input",),  # DALI and torch batches of each rank's part
    ("evaluation",),  # distances, ranking, metrics, the distributed evaluator
    ("tracking",),  # MLflow plumbing: runs, logged and registered models, the server
    ("train",),  # the Ray-free engine
    ("planning",),  # reid plan's arithmetic, from the components' own facts
    ("run",),  # the run wing: Ray Train's driver, worker and controller callback, publishing
    ("tune",),  # hyperparameter search: Ray Tune trials that are training runs, MLflow parent and children
    ("search",),  # galleries: embedding with Ray Data, FAISS indexes, search, the Ray Serve service
    ("cluster",),  # Ray node start-up, job submission
    ("cli",),  # the reid command
)
RANK = {name: level for level, names in enumerate(LAYERS) for name in names}


def _run_config_sections() -> frozenset[str]:
    """The run config and the modules it imports from (its sections' owners)."""
    tree = ast.parse((REPO / PACKAGE / "config.py").read_text())
    owners = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    return frozenset({f"{PACKAGE}.config"} | {module for module in owners if module.endswith(".config")})


CONFIGS = _run_config_sections()


def room(module: str) -> str:
    """The layer entry of a dotted module name under ``reid_platform``."""
    if module in CONFIGS:
        return "configs"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    line: int
    target: str  # the imported module

    @property
    def upward(self) -> bool:
        return RANK[room(self.target)] > RANK[room(self.source)]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports() -> list[Import]:
    """Every import of one package's module by another package's, top-level or inside a function."""
    between = []
    for source, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                module = _absolute(node, source, is_package=path.name == "__init__.py")
                # ``from reid_platform import x`` imports the module x
                targets = [f"{module}.{alias.name}" for alias in node.names] if module == PACKAGE else [module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith(PACKAGE + ".") and room(target) != room(source):
                    between.append(Import(source, node.lineno, target))
    return between


def _absolute(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    """The absolute module name of ``from [.]module import ...`` in module ``source``."""
    if not node.level:
        return node.module or ""
    parts = source.split(".")
    base = parts if is_package else parts[:-1]  # a package's __init__ is relative to itself
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def unplaced() -> set[str]:
    """Packages and root modules missing from LAYERS."""
    return {room(module) for module in modules() if module != PACKAGE} - set(RANK)


def main() -> int:
    print("order, lowest first: " + " < ".join("/".join(names) for names in LAYERS))
    if missing := unplaced():
        print(f"not in LAYERS: {', '.join(sorted(missing))}")
        return 1
    by_room: dict[str, set[str]] = {}
    for found in imports():
        by_room.setdefault(room(found.source), set()).add(room(found.target))
    for name in (name for names in LAYERS for name in names):
        print(f"  {name:<11} imports {', '.join(sorted(by_room.get(name, ()), key=RANK.get)) or '-'}")
    upward = [found for found in imports() if found.upward]
    for found in upward:
        print(f"UPWARD {modules()[found.source].relative_to(REPO)}:{found.line}: {found.target}")
    print(f"{len(upward)} upward imports")
    return 1 if upward else 0


if __name__ == "__main__":
    sys.exit(main())
