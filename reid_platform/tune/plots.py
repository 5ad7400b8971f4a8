"""The search's picture: each trial's metric against each searched parameter, one panel per parameter."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from reid_platform.tune.space import Space  # noqa: E402

MARKERS = {"finished": ("o", "tab:blue"), "stopped early": ("x", "tab:red")}  # failed trials have no metric


def trials_picture(rows, space: Space, metric: str, path: Path) -> Path:
    """A scatter of ``metric`` (the last evaluated epoch's) against each dimension of ``space``: finished
    trials as dots, trials stopped early as crosses. Choices that are not numbers are placed by index."""
    columns = len(space.dimensions)
    figure, axes = plt.subplots(1, columns, figsize=(3.2 * columns + 0.6, 3.2), sharey=True, squeeze=False)
    for axis, dimension in zip(axes[0], space.dimensions):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dimension.values)
        for status, (marker, color) in MARKERS.items():
            points = [(row.values[dimension.key], row.metrics[metric]) for row in rows
                      if row.status == status and metric in row.metrics and dimension.key in row.values]  # fmt: skip
            if not numeric:
                points = [(list(dimension.values).index(x), y) for x, y in points]
            if points:
                xs, ys = zip(*points)
                axis.scatter(xs, [100 * y for y in ys], marker=marker, color=color, label=status)
        if dimension.log_scale:
            axis.set_xscale("log")
        if not numeric:
            axis.set_xticks(range(len(dimension.values)), [str(v) for v in dimension.values])
        axis.set_xlabel(dimension.key)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (%)")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{len(rows)} trials: {metric} of the last evaluated epoch")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
