"""The trained-model format: weights in safetensors plus a JSON description, no pickle.

A model directory holds ``model.safetensors`` (the ReIDNet state dict) and ``model.json``:

    {"format": "reid-platform-model/2",
     "model": {"arch": ..., "embedding_dim": ..., "last_stride": ...},          # rebuilds the network
     "preprocessing": {"height": ..., "width": ..., "mean": [...], "std": [...]}}  # feeds it

The description holds only what the network needs, never the training input config, so renaming a
training option breaks no saved model. Version 1 directories (``"spec"`` and the whole training
``"input"`` section) still load: only their architecture and preprocessing fields are read.
Loading runs no code from the files, so a model pulled from a registry is safe to open.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from reid_platform.errors import ModelFormatError
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import ModelConfig, Preprocessing
from reid_platform.section import describe

WEIGHTS, DESCRIPTION = "model.safetensors", "model.json"
FORMAT = "reid-platform-model/2"
FORMAT_V1 = "reid-platform-model/1"


def save_model_dir(model: ReIDNet, preprocessing: Preprocessing, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, directory / WEIGHTS)
    description = {
        "format": FORMAT,
        "model": model.cfg.architecture(),
        "preprocessing": Preprocessing.of(preprocessing).model_dump(mode="json"),
    }
    (directory / DESCRIPTION).write_text(json.dumps(description, indent=2))
    return directory


def read_description(directory: str | Path) -> tuple[ModelConfig, Preprocessing]:
    """(architecture, preprocessing) of a model directory of either format version."""
    path = Path(directory) / DESCRIPTION
    try:
        description = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{directory}: not a model directory (no {DESCRIPTION})") from None
    except json.JSONDecodeError as error:
        raise ModelFormatError(f"{path}: not valid JSON: {error}") from None
    version = description.get("format") if isinstance(description, dict) else None
    if version == FORMAT:
        architecture, preprocessing = description.get("model"), description.get("preprocessing")
    elif version == FORMAT_V1:  # the whole training input section: keep only the preprocessing fields
        architecture = description.get("spec")
        preprocessing = {key: value for key, value in (description.get("input") or {}).items() if key in Preprocessing.model_fields}
    else:
        raise ModelFormatError(f"{path}: format {version!r}, expected {FORMAT!r} (or {FORMAT_V1!r})")
    try:
        return ModelConfig.model_validate(architecture), Preprocessing.model_validate(preprocessing)
    except ValidationError as error:
        raise ModelFormatError(f"{path}: {describe(error)}") from None


def load_model_dir(directory: str | Path) -> tuple[ReIDNet, Preprocessing]:
    """(model in eval mode, the preprocessing it expects)."""
    directory = Path(directory)
    architecture, preprocessing = read_description(directory)
    model = ReIDNet(architecture, preprocessing)
    try:
        state = load_file(directory / WEIGHTS)
    except (SafetensorError, OSError) as error:
        raise ModelFormatError(f"{directory / WEIGHTS}: not a readable safetensors file ({error})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ModelFormatError(f"{directory / WEIGHTS}: does not fit a {architecture.arch} network: {first}") from None
    return model.eval(), preprocessing
