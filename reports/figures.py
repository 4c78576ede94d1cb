"""Matplotlib figures of the report; each takes tidy tables and returns a Figure.

Why functions over tidy tables: the notebook stays a short, readable script (load, compute,
plot), and every figure can be re-made from ``results.csv`` or straight from MLflow.
Colours are fixed per strategy (same colour in every figure of a report).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

PALETTE = plt.get_cmap("tab10").colors

NICE = {
    "val_auc": "validation AUC", "val_acc": "validation accuracy", "val_loss": "validation loss",
    "train_loss": "training loss", "val_balanced_acc": "validation balanced accuracy",
    "val_f1": "validation F1", "mean_epoch_time_s": "wall time per epoch (s)",
    "peak_memory_mb": "peak memory (MiB)", "epoch_time_s": "epoch time (s)",
    "total_time_s": "total time per run (s)",
}


def figure_html(fig: Figure, alt: str, dpi: int = 110) -> str:
    """``<img class="metalr-figure" alt=...>`` with the PNG inline: survives nbconvert with code
    hidden, needs no matplotlib backend set-up in the kernel, and is findable by its alt text."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<img class="metalr-figure" alt="{html.escape(alt)}" '
            f'style="max-width:100%;height:auto" src="data:image/png;base64,{data}"/>')


def colours(strategies: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A stable colour per strategy label (MetaLR, when present, gets the first colour)."""
    order = sorted(strategies, key=lambda s: (not s.startswith("metalr"), s))
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(order)}


def _style(ax: plt.Axes) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, alpha=0.3, linewidth=0.6)


def _band(ax: plt.Axes, g: pd.DataFrame, label: str, colour, *, marker: str = "o") -> None:
    """Mean over seeds with a ±1 std band; ``g`` has columns step, seed, value."""
    agg = g.groupby("step")["value"].agg(["mean", "std", "count"]).sort_index()
    x = agg.index.to_numpy() + 1  # epochs are 0-based in MLflow; show 1-based
    ax.plot(x, agg["mean"], color=colour, marker=marker, markersize=3, linewidth=1.6,
            label=label)
    std = agg["std"].fillna(0).to_numpy()
    ax.fill_between(x, agg["mean"] - std, agg["mean"] + std, color=colour, alpha=0.18,
                    linewidth=0)


def learning_curves(hist: pd.DataFrame, metrics: Sequence[str] = ("val_auc", "val_loss",
                    "train_loss")) -> Figure:
    """Rows: datasets; columns: metrics; a line per strategy (mean over seeds ± 1 std)."""
    datasets = sorted(hist["dataset_key"].unique())
    metrics = [m for m in metrics if m in set(hist["key"])]
    cmap = colours(hist["strategy_label"].unique())
    fig, axes = plt.subplots(len(datasets), len(metrics), squeeze=False,
                             figsize=(4.2 * len(metrics), 3.0 * len(datasets)),
                             layout="constrained")
    for i, ds in enumerate(datasets):
        for j, metric in enumerate(metrics):
            ax = axes[i, j]
            sub = hist[(hist["dataset_key"] == ds) & (hist["key"] == metric)]
            for s, g in sub.groupby("strategy_label"):
                _band(ax, g, s, cmap[s])
            ax.set_title(f"{ds}: {NICE.get(metric, metric)}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
            _style(ax)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6),
               frameon=False)
    return fig


def lr_per_group(hist: pd.DataFrame, groups: Sequence[str] | None = None) -> Figure:
    """Learning rate per layer group over training, log scale; rows strategies, columns datasets.

    ``hist``: long rows with keys ``lr/<group>``, dataset_key, strategy_label; mean over seeds
    ± 1 std. MetaLR (when present) comes first.
    """
    lr = hist[hist["key"].str.startswith("lr/")].copy()
    lr["group"] = lr["key"].str.removeprefix("lr/")
    present = set(lr["group"])
    order = [g for g in (groups or []) if g in present] + sorted(present - set(groups or []))
    datasets = sorted(lr["dataset_key"].unique())
    strategies = sorted(lr["strategy_label"].unique(),
                        key=lambda s: (not s.startswith("metalr"), s))
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(len(strategies), len(datasets), squeeze=False, sharey=True,
                             figsize=(3.8 * len(datasets) + 1.5, 2.8 * len(strategies)),
                             layout="constrained")
    for j, ds in enumerate(datasets):
        for i, s in enumerate(strategies):
            ax = axes[i, j]
            sub = lr[(lr["strategy_label"] == s) & (lr["dataset_key"] == ds)]
            for k, g in enumerate(order):
                gg = sub[sub["group"] == g]
                if not gg.empty:
                    _band(ax, gg, g, cmap(k / max(len(order) - 1, 1)), marker=".")
            ax.set_yscale("log")
            ax.set_title(f"{ds}: {s}", fontsize=10,
                         fontweight="bold" if s.startswith("metalr") else None)
            ax.set_xlabel("epoch")
            if j == 0:
                ax.set_ylabel("learning rate")
            ax.xaxis.get_major_locator().set_params(integer=True)
            _style(ax)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="layer group\n(input → output)",
               frameon=False, fontsize=8)
    return fig


def drift_heatmap(drift: pd.DataFrame, groups: Sequence[str] | None = None) -> Figure:
    """Strategies x layer groups, mean relative drift over seeds; one panel per dataset."""
    datasets = sorted(drift["dataset_key"].unique())
    present = set(drift["group"])
    order = [g for g in (groups or []) if g in present] + sorted(present - set(groups or []))
    tables = {ds: drift[drift["dataset_key"] == ds].pivot_table(
        index="strategy_label", columns="group", values="drift", aggfunc="mean"
    ).reindex(columns=order) for ds in datasets}
    vmax = max(float(np.nanmax(t.to_numpy())) for t in tables.values()) or 1.0
    n_strat = max(t.shape[0] for t in tables.values())
    ncols = min(len(datasets), 3)
    nrows = math.ceil(len(datasets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(ncols * max(3.5, 0.55 * len(order) + 1.4) + 1.0,
                                      nrows * (0.42 * n_strat + 1.3)))
    im = None
    for idx, (ax, ds) in enumerate(zip(axes.flat, datasets, strict=False)):
        t = tables[ds]
        im = ax.imshow(t.to_numpy(), cmap="magma_r", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(t.shape[1]), t.columns, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(t.shape[0]), t.index if idx % ncols == 0 else [""] * t.shape[0],
                      fontsize=9)
        for (i, j), v in np.ndenumerate(t.to_numpy()):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 * vmax else "black")
        ax.set_title(ds, fontsize=10)
    for ax in list(axes.flat)[len(datasets):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="relative drift from pre-trained",
                 shrink=0.9)
    return fig


def confusion_matrices(mats: dict[str, pd.DataFrame], title: str) -> Figure:
    """One pooled confusion matrix per strategy (rows: true class; counts and row shares)."""
    fig, axes = plt.subplots(1, len(mats), squeeze=False, layout="constrained",
                             figsize=(3.2 * len(mats), 3.0))
    for ax, (strategy, m) in zip(axes.flat, mats.items(), strict=True):
        counts = m.to_numpy()
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(m.columns)), m.columns, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(m.index)), m.index, fontsize=8)
        for (i, j), v in np.ndenumerate(counts):
            ax.text(j, i, f"{v}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black")
        ax.set_title(strategy, fontsize=10)
        ax.set_xlabel("predicted")
    axes.flat[0].set_ylabel("true")
    fig.suptitle(title, fontsize=10)
    return fig


def cd_diagram(avg_ranks: pd.Series, cd: float, cliques: Sequence[Sequence[str]],
               title: str = "") -> Figure:
    """Demšar's critical-difference diagram: average ranks on an axis, CD bar, cliques joined."""
    k = len(avg_ranks)
    lo, hi = 1, max(k, 2)
    names = list(avg_ranks.index)
    vals = avg_ranks.to_numpy()
    half = math.ceil(k / 2)
    height = 1.6 + 0.32 * half + 0.2 * len(cliques)
    fig, ax = plt.subplots(figsize=(8, height), layout="constrained")
    ax.set_xlim(lo - 0.3, hi + 0.3)
    ax.set_ylim(-(0.35 * half + 0.4 + 0.2 * len(cliques)), 1.0)
    ax.axis("off")
    ax.hlines(0, lo, hi, color="black", linewidth=1)
    for r in range(lo, hi + 1):
        ax.vlines(r, 0, 0.08, color="black", linewidth=1)
        ax.text(r, 0.14, str(r), ha="center", va="bottom", fontsize=9)
    ax.text((lo + hi) / 2, 0.55, "average rank (1 = best)", ha="center", fontsize=9)
    # CD bar
    ax.hlines(0.85, lo, lo + cd, color="firebrick", linewidth=2)
    ax.vlines([lo, lo + cd], 0.8, 0.9, color="firebrick", linewidth=2)
    ax.text(lo + cd / 2, 0.92, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9,
            color="firebrick")
    for i, (name, v) in enumerate(zip(names, vals, strict=True)):
        left = i < half
        row = i if left else k - 1 - i
        y = -(0.35 * row + 0.35)
        x_text = lo - 0.25 if left else hi + 0.25
        ax.plot([v, v, x_text], [0, y, y], color="0.3", linewidth=0.9)
        ax.text(x_text, y, f"{name} ({v:.2f})", ha="right" if left else "left", va="center",
                fontsize=9)
    for j, clique in enumerate(cliques):
        r = avg_ranks[list(clique)]
        y = -0.12 - 0.12 * j
        ax.hlines(y, r.min() - 0.03, r.max() + 0.03, color="black", linewidth=3.5)
    if title:
        ax.set_title(title, fontsize=10)
    # names sit outside the rank axis: leave room
    ax.set_xlim(lo - 1.6, hi + 1.6)
    return fig


def cost_bars(results: pd.DataFrame, metrics: Sequence[str] = ("mean_epoch_time_s",
              "peak_memory_mb")) -> Figure:
    """Mean ± std over seeds per strategy (and dataset) for each cost metric."""
    metrics = [m for m in metrics if m in results]
    datasets = sorted(results["dataset_key"].unique())
    strategies = sorted(results["strategy_label"].unique())
    cmap = colours(strategies)
    fig, axes = plt.subplots(1, len(metrics), squeeze=False, layout="constrained",
                             figsize=(max(4.5, 1.0 + 0.5 * len(strategies) * len(datasets))
                                      * len(metrics) / 1.4, 3.4))
    width = 0.8 / len(strategies)
    for ax, metric in zip(axes[0], metrics, strict=True):
        agg = results.groupby(["dataset_key", "strategy_label"])[metric].agg(["mean", "std"])
        for j, s in enumerate(strategies):
            xs, ms, ss = [], [], []
            for i, ds in enumerate(datasets):
                if (ds, s) in agg.index:
                    xs.append(i + (j - (len(strategies) - 1) / 2) * width)
                    ms.append(agg.loc[(ds, s), "mean"])
                    ss.append(agg.loc[(ds, s), "std"])
            ax.bar(xs, ms, width=width * 0.95, yerr=np.nan_to_num(ss), color=cmap[s], label=s,
                   capsize=2, error_kw={"linewidth": 0.8})
        ax.set_xticks(range(len(datasets)), datasets)
        ax.set_title(NICE.get(metric, metric), fontsize=10)
        _style(ax)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6),
               frameon=False)
    return fig


def optuna_figures(study) -> list[Figure]:
    """Optimisation history and, when there are parameters, slice and importance plots."""
    import warnings

    import matplotlib
    from optuna.visualization import matplotlib as ovm

    figs = []
    # optuna's plots call plt.style.use("ggplot"): keep that from leaking into later figures
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")  # optuna marks the matplotlib backend experimental
        plots = [ovm.plot_optimization_history]
        if study.best_trial.params:
            plots.append(ovm.plot_slice)
        if len(study.best_trial.params) >= 2:
            plots.append(ovm.plot_param_importances)
        for plot in plots:
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ImportError):
                continue
            ax0 = ax.flat[0] if isinstance(ax, np.ndarray) else ax
            fig = ax0.figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 7), 3.6)
            figs.append(fig)
    return figs


def transferability_profile(trans: pd.DataFrame, groups: Sequence[str] | None = None,
                            palette: dict[str, tuple[float, float, float]] | None = None,
                            reference: str = "full",
                            subtitles: Mapping[str, str] | None = None) -> Figure:
    """Per-layer transferability T per strategy (mean over seeds ± 1 std), one panel per dataset.

    ``subtitles``: a second title line per dataset (what θ_r was, see
    ``reports.transferability.reference_labels``).

    ``trans``: long rows ``dataset_key, strategy_label, strategy, group, transferability``;
    groups follow ``groups`` (the drift heat-map's order), colours ``palette`` (default
    :func:`colours`); ``reference`` (full fine-tuning, the paper's) is drawn thickest. Log
    scale; the dashed line is T = 1 (pre-trained no closer to the end than a random start).
    """
    datasets = sorted(trans["dataset_key"].unique())
    present = set(trans["group"])
    order = [g for g in (groups or []) if g in present] + sorted(present - set(groups or []))
    cmap = palette or colours(trans["strategy_label"].unique())
    refs = set(trans.loc[trans["strategy"] == reference, "strategy_label"])
    ncols = min(len(datasets), 3)
    nrows = math.ceil(len(datasets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained", sharey=True,
                             figsize=(ncols * max(3.8, 0.55 * len(order) + 1.6),
                                      nrows * 3.2 + 0.6))
    for ax, ds in zip(axes.flat, datasets, strict=False):
        sub = trans[trans["dataset_key"] == ds]
        for s in sorted(sub["strategy_label"].unique(), key=lambda s: (s in refs, s)):
            agg = (sub[sub["strategy_label"] == s].groupby("group")["transferability"]
                   .agg(["mean", "std"]).reindex(order))
            x = np.arange(len(order))
            ok = agg["mean"].notna().to_numpy()
            ax.errorbar(x[ok], agg["mean"].to_numpy()[ok],
                        yerr=agg["std"].fillna(0).to_numpy()[ok], color=cmap.get(s, "0.4"),
                        marker="o", markersize=3.5, capsize=2,
                        linewidth=2.6 if s in refs else 1.3, zorder=3 if s in refs else 2,
                        label=f"{s} (reference)" if s in refs else s)
        ax.axhline(1.0, color="0.35", linestyle="--", linewidth=0.9)
        ax.set_yscale("log")
        ax.set_xticks(range(len(order)), order, rotation=35, ha="right", fontsize=8)
        sub_title = (subtitles or {}).get(ds)
        ax.set_title(f"{ds}\n{sub_title}" if sub_title else ds, fontsize=10 if not sub_title
                     else 8)
        _style(ax)
    axes[0, 0].set_ylabel("transferability T (log)")
    for ax in list(axes.flat)[len(datasets):]:
        ax.set_visible(False)
    handles: dict[str, object] = {}  # one entry per strategy over all panels
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=min(len(handles), 5), frameon=False)
    return fig


class _PlainLogLabels(plt.LogFormatter):
    """Log-axis labels as plain numbers (0.00012, 30): matplotlib picks which ticks to label,
    but its ``3×10¹`` minor labels overlap on axes that span about one decade."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:.3g}" if super().__call__(x, pos) else ""


def lr_vs_transferability(points: pd.DataFrame, corr: pd.DataFrame,
                          palette: dict[str, tuple[float, float, float]] | None = None) -> Figure:
    """Each layer group's mean LR over training (y) against its T under full fine-tuning (x),
    log-log, one panel per (dataset, layer-wise strategy) with its Spearman ρ and p; points
    are labelled with their group and joined in input -> output order."""
    cmap = palette or colours(points["strategy_label"].unique())
    keys = list(zip(corr["dataset_key"], corr["strategy_label"], strict=True))
    ncols = min(len(keys), 3)
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(ncols * 3.9, nrows * 3.3))
    for ax, (ds, s), (_, row) in zip(axes.flat, keys, corr.iterrows(), strict=False):
        sub = points[(points["dataset_key"] == ds) & (points["strategy_label"] == s)]
        ax.plot(sub["transferability"], sub["mean_lr"], color="0.75", linewidth=0.8, zorder=1)
        ax.scatter(sub["transferability"], sub["mean_lr"], color=cmap.get(s, "0.4"), s=22,
                   zorder=2)
        for _, r in sub.iterrows():
            ax.annotate(r["group"], (r["transferability"], r["mean_lr"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(_PlainLogLabels(labelOnlyBase=False))
            axis.set_minor_formatter(_PlainLogLabels(labelOnlyBase=False))
        ax.tick_params(which="both", labelsize=7)
        p = row["p"]
        shown_p = "n/a" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
        ax.set_title(f"{ds}: {s}\nρ = {row['rho']:.2f}, p = {shown_p} ({row['verdict']})",
                     fontsize=9)
        ax.set_xlabel("T of full fine-tuning (log)")
        ax.set_ylabel("mean LR over training (log)")
        _style(ax)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    return fig
