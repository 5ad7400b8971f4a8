"""Embeddings of image files with a trained model, preprocessed exactly as in evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from reid_platform.data.images import decode_rgb
from reid_platform.errors import DatasetError
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import Preprocessing
from reid_platform.model.preprocess import eval_transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def expand_image_paths(arguments: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the images below them (sorted); missing paths are an error."""
    paths: list[Path] = []
    for argument in map(Path, arguments):
        if argument.is_dir():
            found = sorted(p for p in argument.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DatasetError(f"{argument}: no .jpg, .jpeg or .png images in this folder")
            paths += found
        elif argument.is_file():
            paths.append(argument)
        else:
            raise DatasetError(f"{argument}: no such file or folder")
    return paths


def _load(path: Path, transform) -> tuple[torch.Tensor | None, str]:
    image, reason = decode_rgb(path)
    return (None, reason) if reason else (transform(image), "")


@torch.no_grad()
def embed_images(
    model: ReIDNet,
    preprocessing: Preprocessing,
    paths: list[Path],
    batch_size: int = 64,
    device: torch.device | None = None,
    flip: bool = False,
) -> np.ndarray:
    """(len(paths), feature_dim) float32 L2-normalised embeddings, in the order of ``paths``; with
    ``flip``, of each image averaged with its mirror (as ``evaluation.flip``).

    Images are decoded a batch at a time. After the first bad file, the rest are only checked, so
    the error names every bad file instead of returning half a result.
    """
    device = device or next(model.parameters()).device
    model = model.eval().to(device)
    transform = eval_transform(preprocessing)
    problems: list[str] = []
    chunks, batch = [], []
    for path in paths:
        tensor, reason = _load(path, transform)
        if reason:
            problems.append(f"{path}: {reason}")
        elif not problems:
            batch.append(tensor)
            if len(batch) == batch_size:
                chunks.append(model.embed(torch.stack(batch).to(device), flip).float().cpu())
                batch = []
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DatasetError(f"{len(problems)} of {len(paths)} images cannot be read: " + "; ".join(problems[:10]) + more)
    if batch:
        chunks.append(model.embed(torch.stack(batch).to(device), flip).float().cpu())
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, model.feature_dim), np.float32)


def save_embeddings(path: Path, embeddings: np.ndarray, image_paths: list[Path]) -> None:
    """An .npz with ``embeddings`` (N, D) float32 and ``paths`` (N,) as text: loads with allow_pickle=False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        np.savez(file, embeddings=embeddings, paths=np.array([str(p) for p in image_paths], dtype=str))
