"""ONNX export of a trained model, checked against PyTorch with onnxruntime before it is kept.

The graph takes ``images`` (N, 3, H, W), normalised as in training (the mean and std are written into
the model's metadata), and returns ``embeddings`` (N, D), L2-normalised: what a retrieval service
compares. The batch dimension is dynamic. With ``flip`` the graph averages each image's embedding with
its horizontal mirror's (``evaluation.flip``), and the metadata says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F

from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import Preprocessing

INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


class _RetrievalEmbedding(torch.nn.Module):
    def __init__(self, model: ReIDNet, flip: bool):
        super().__init__()
        self.model, self.flip = model, flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embeddings = self.model(images)
        if self.flip:
            embeddings = embeddings + self.model(images.flip(-1))
        return F.normalize(embeddings, dim=1)


@dataclass(frozen=True)
class ExportCheck:
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    tolerance: float


def export_onnx(
    model: ReIDNet, preprocessing: Preprocessing, out: Path, tolerance: float = 1e-4, flip: bool = False
) -> ExportCheck:
    """Write ``out`` and compare onnxruntime with PyTorch on random inputs of two batch sizes.

    Raises ValueError (and removes ``out``) when any output differs by more than ``tolerance``.
    """
    wrapper = _RetrievalEmbedding(model.eval().cpu(), flip).eval()
    example = torch.randn(2, 3, preprocessing.height, preprocessing.width)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        wrapper, (example,), str(out), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )  # fmt: skip
    try:
        graph = onnx.load(str(out))
        metadata = {
            "model": json.dumps(model.cfg.architecture()),
            "preprocessing": json.dumps(Preprocessing.of(preprocessing).model_dump(mode="json")),
            "flip": json.dumps(flip),
        }
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(out))
        batch_sizes, worst = _compare_with_pytorch(out, wrapper, preprocessing)
    except Exception:
        out.unlink(missing_ok=True)  # never leave a graph that was not checked
        raise
    if worst > tolerance:
        out.unlink()
        raise ValueError(f"ONNX export differs from PyTorch by {worst:.2e} (> {tolerance:.0e}); nothing was written")
    return ExportCheck(batch_sizes, worst, tolerance)


def _compare_with_pytorch(path: Path, wrapper: torch.nn.Module, preprocessing: Preprocessing) -> tuple[tuple[int, ...], float]:
    """The largest difference between onnxruntime and PyTorch on random inputs of two batch sizes."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    batch_sizes, worst = (1, 5), 0.0
    for batch in batch_sizes:
        images = torch.randn(batch, 3, preprocessing.height, preprocessing.width, generator=generator)
        with torch.no_grad():
            expected = wrapper(images).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        worst = max(worst, float(np.abs(got - expected).max()))
    return batch_sizes, worst
