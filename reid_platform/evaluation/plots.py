"""The pictures people look at after an evaluation: the CMC curve and ranked lists of examples."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; workers and CI have no display
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from reid_platform.data.manifest import ShardDataset
from reid_platform.data.pack import read_images
from reid_platform.evaluation.distributed import Evaluation
from reid_platform.evaluation.metrics import summarize
from reid_platform.evaluation.ranking import top_ranked

CMC_RANKS = 50
MATCH, NON_MATCH, QUERY = "#1a9c3c", "#d62728", "#1f4e9c"


def plot_cmc(cmc: np.ndarray, path: Path, title: str = "CMC") -> Path:
    ranks = np.arange(1, len(cmc) + 1)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    axes.plot(ranks, cmc * 100, marker="o", markersize=3)
    for k in (1, 5, 10):
        if k <= len(cmc):
            axes.annotate(f"rank-{k} {cmc[k - 1]:.1%}", (k, cmc[k - 1] * 100), textcoords="offset points", xytext=(6, -12))
    axes.set(xlabel="rank", ylabel="matching rate (%)", title=title, ylim=(0, 100.5), xlim=(1, len(cmc)))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_ranked_lists(rows: list[tuple[bytes, list[bytes], list[bool]]], path: Path) -> Path:
    """One row per query: the query image, then its ranked gallery images framed green (true) or red."""
    columns = 1 + max(len(gallery) for _, gallery, _ in rows)
    figure, grid = plt.subplots(len(rows), columns, figsize=(columns * 0.9, len(rows) * 1.9), dpi=100, squeeze=False)
    for axes_row, (query, gallery, matches) in zip(grid, rows):
        cells = [(query, QUERY, "query")] + [
            (image, MATCH if match else NON_MATCH, str(rank)) for rank, (image, match) in enumerate(zip(gallery, matches), 1)
        ]
        for axes in axes_row:
            axes.set_axis_off()
        for axes, (image, colour, label) in zip(axes_row, cells):
            axes.set_axis_on()
            axes.imshow(Image.open(io.BytesIO(image)).convert("RGB"))
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_title(label, fontsize=7)
            for spine in axes.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
    figure.tight_layout(pad=0.3)
    figure.savefig(path)
    plt.close(figure)
    return path


def write_pictures(
    evaluation: Evaluation, dataset: ShardDataset, out_dir: Path, num_queries: int = 8, top: int = 10
) -> list[Path]:
    """``cmc.png`` and ``ranked_lists.png`` (queries spread evenly over the valid ones) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmc = summarize(evaluation.results, max_rank=min(CMC_RANKS, len(evaluation.gallery))).cmc
    valid = torch.nonzero(evaluation.results.valid).squeeze(1)
    picks = valid[torch.linspace(0, len(valid) - 1, min(num_queries, len(valid))).long()].tolist()
    ranked = top_ranked(evaluation.query, evaluation.gallery, evaluation.distances, picks, top, evaluation.cfg.protocol)
    query_images = read_images(dataset, "query", picks)
    gallery_images = read_images(dataset, "gallery", {index for indices, _ in ranked for index in indices})
    rows = [
        (query_images[q], [gallery_images[g] for g in indices], matches)
        for q, (indices, matches) in zip(picks, ranked)
    ]
    return [plot_cmc(cmc, out_dir / "cmc.png"), plot_ranked_lists(rows, out_dir / "ranked_lists.png")]
