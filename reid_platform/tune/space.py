"""The search space file of `reid tune`: config keys with the distribution each is drawn from.

    loss.scale: {loguniform: [16, 256]}
    loss.margin: {uniform: [0.15, 0.45]}
    train.lr: {loguniform: [1.0e-4, 1.0e-3]}
    train.decay_start_epochs: {randint: [2, 8]}      # both ends included
    input.images_per_identity: {choice: [2, 4, 8]}
    loss.label_smoothing: {grid: [0.0, 0.1]}         # every value, in every sample

Every key is checked against the config classes before anything starts: it must name a field of
the run config, its distribution must give values of the field's type (a float range for an
integer field is refused), and the config must accept the ends of a range and every listed value
(with the rest of the base config as it is). Each problem is one ``ConfigError`` naming the file
and the key (exit status 2).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from reid_platform.config import RunConfig
from reid_platform.errors import ConfigError
from reid_platform.section import validate

RANGES = {"uniform": float, "loguniform": float, "randint": int, "lograndint": int}  # [low, high] of this type
LISTS = ("choice", "grid")  # a list of values
DISTRIBUTIONS = (*RANGES, *LISTS)


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # (low, high) of a range, or the listed values

    @property
    def log_scale(self) -> bool:
        return self.kind.startswith("log")

    def describe(self) -> str:
        return f"{self.kind}({', '.join(map(str, self.values))})"

    def to_tune(self):
        """The Ray Tune domain (``ray.tune`` is imported here: the rest of this module stays Ray-free)."""
        from ray import tune

        low, high = self.values[:2] if self.kind in RANGES else (None, None)
        return {
            "uniform": lambda: tune.uniform(low, high),
            "loguniform": lambda: tune.loguniform(low, high),
            "randint": lambda: tune.randint(low, high + 1),  # Tune's upper end is excluded, ours included
            "lograndint": lambda: tune.lograndint(low, high + 1),
            "choice": lambda: tune.choice(list(self.values)),
            "grid": lambda: tune.grid_search(list(self.values)),
        }[self.kind]()


@dataclass(frozen=True)
class Space:
    path: Path
    dimensions: tuple[Dimension, ...]

    def to_tune(self) -> dict[str, Any]:
        return {d.key: d.to_tune() for d in self.dimensions}

    def params(self) -> dict[str, str]:
        """For the search's MLflow run: ``space.KEY`` -> the distribution."""
        return {f"space.{d.key}": d.describe() for d in self.dimensions}


def with_values(cfg: RunConfig, values: dict[str, Any], where: str) -> RunConfig:
    """``cfg`` with dotted ``values`` set; a ConfigError naming ``where`` when the config refuses them."""
    tree = cfg.model_dump(mode="json")
    for key, value in values.items():
        *sections, name = key.split(".")
        node = tree
        for part in sections:  # a section the config leaves out (loss.pairwise: null) starts empty
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[name] = value
    return validate(RunConfig, tree, where)


def _field(key: str) -> tuple[Any, bool]:
    """(the annotation of the run-config field ``key`` names, whether it is a whole section);
    (None, False) when no field has that name."""
    model: type[BaseModel] | None = RunConfig
    annotation = None
    for part in key.split("."):
        if model is None or part not in model.model_fields:
            return None, False
        annotation = model.model_fields[part].annotation
        model = next((a for a in _members(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return annotation, model is not None


def _members(annotation: Any) -> tuple:
    """The types a field's annotation admits (the members of a union, the annotation otherwise)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _value(cfg: RunConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _number(value: Any, of: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if of is int else isinstance(value, (int, float))


def _dimension(key: Any, spec: Any, where: str, base: RunConfig) -> Dimension:
    annotation, section = _field(key) if isinstance(key, str) else (None, False)
    if section:
        raise ConfigError(f"{where}: {key!r} is a section: name each of its keys to search (e.g. loss.scale)")
    if annotation is None:
        raise ConfigError(f"{where}: {key!r} is not a config key (a dotted key of a value, e.g. loss.scale)")
    parent = key.rpartition(".")[0]
    if parent.count(".") and _value(base, parent) is None:  # an optional section the base config leaves out
        raise ConfigError(f"{where}: {key}: {parent} is not set in the config; set it (--set) to search its keys")
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
        raise ConfigError(
            f"{where}: {key}: give one distribution, {{NAME: VALUES}} with NAME one of {', '.join(DISTRIBUTIONS)} "
            f"(got {spec!r})"
        )
    ((kind, values),) = spec.items()
    admits = _members(annotation)
    if kind in RANGES:
        of = RANGES[kind]
        if not (isinstance(values, list) and len(values) == 2 and all(_number(v, of) for v in values)):
            raise ConfigError(f"{where}: {key}: {kind} takes [LOW, HIGH], two {of.__name__}s (got {values!r})")
        low, high = values
        if not low < high or (kind.startswith("log") and low <= 0):
            raise ConfigError(f"{where}: {key}: {kind} needs LOW < HIGH" + (" and LOW > 0" if kind.startswith("log") else "")
                              + f" (got {values!r})")  # fmt: skip
        if float not in admits and not (of is int and int in admits):
            field_type = "an integer" if int in admits else "not a number"
            hint = "; use randint or lograndint" if int in admits else "; use choice"
            raise ConfigError(f"{where}: {key} is {field_type}: {kind} draws {of.__name__}s{hint}")
    elif not (isinstance(values, list) and values):
        raise ConfigError(f"{where}: {key}: {kind} takes a list of values (got {values!r})")
    for value in values:  # a range's ends, or every listed value
        try:
            with_values(base, {key: value}, where)
        except ConfigError as error:
            reason = str(error).split(": invalid config: ", 1)[-1]
            raise ConfigError(f"{where}: {key}: the config refuses {value!r} of {kind} {values!r}: {reason}") from None
    return Dimension(key, kind, tuple(values))


def load_space(path: str | Path, base: RunConfig) -> Space:
    """The space file at ``path``, every dimension checked against the config classes and ``base``."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the search space: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{path}: a search space is a mapping of config keys to distributions, e.g. "
                          "'loss.scale: {loguniform: [16, 256]}'")  # fmt: skip
    return Space(path, tuple(_dimension(key, spec, str(path), base) for key, spec in tree.items()))
