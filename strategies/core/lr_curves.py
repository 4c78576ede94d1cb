"""The learned-LR figure (the MetaLR paper's Fig. 4): one line per layer group, log scale."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def lr_curves_figure(
    steps: Sequence[int], rates: np.ndarray, names: Sequence[str], title: str = "MetaLR"
):
    """``rates``: array ``[len(steps), len(names)]`` of per-group learning rates."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"]
    n = max(len(names) - 1, 1)
    for i, name in enumerate(names):
        ax.plot(steps, rates[:, i], label=name, color=cmap(i / n), linewidth=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{title}: learned layer-wise learning rates")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
