"""The trained-model format: weights in safetensors plus a JSON description, no pickle.

A model directory holds ``model.safetensors`` (the ReIDNet state dict) and ``model.json`` (the
architecture and the input preprocessing it was trained with). Loading it runs no code from the
file, so a model pulled from a registry is safe to open.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from reid_platform.config import InputConfig
from reid_platform.model.backbone import ModelSpec, ReIDNet

WEIGHTS, DESCRIPTION = "model.safetensors", "model.json"
FORMAT = "reid-platform-model/1"


def save_model_dir(model: ReIDNet, input_cfg: InputConfig, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, directory / WEIGHTS)
    description = {"format": FORMAT, "spec": model.spec.to_dict(), "input": input_cfg.model_dump(mode="json")}
    (directory / DESCRIPTION).write_text(json.dumps(description, indent=2))
    return directory


def load_model_dir(directory: str | Path) -> tuple[ReIDNet, InputConfig]:
    """(model in eval mode, the input config it expects)."""
    directory = Path(directory)
    description_path = directory / DESCRIPTION
    try:
        description = json.loads(description_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory}: not a model directory (no {DESCRIPTION})") from None
    if description.get("format") != FORMAT:
        raise ValueError(f"{description_path}: format {description.get('format')!r}, expected {FORMAT!r}")
    model = ReIDNet(ModelSpec(**description["spec"]))
    try:
        state = load_file(directory / WEIGHTS)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{directory / WEIGHTS}: not a readable safetensors file ({error})") from None
    model.load_state_dict(state)
    return model.eval(), InputConfig(**description["input"])
