"""Per-layer transferability next to the per-layer learning rates, from MLflow tables alone.

Every run that starts from pre-trained weights logs ``transferability/<group>`` (computed in
``benchmark.training.transferability``, Chen et al. 2022): T = D(θ_r, θ_B) / D(θ_A, θ_B), the
mean absolute distance of the group's weights from a random start over that from the
pre-trained start, both to where fine-tuning ended. T > 1: pre-training put the layer closer to
its fine-tuned weights than a random start. The head is re-initialised in every cell, so it
has no T.

Does a strategy give small learning rates to the layers that transfer well? For every strategy
whose logged ``lr/<group>`` differ across groups (found in the data, not from a list of
names), the mean LR of each group over training (mean over epochs, then seeds) is set against
that group's T **of full fine-tuning** (mean over seeds), and Spearman's rank correlation is
tested. Why full fine-tuning's T and not the strategy's own: a group given a small LR barely
moves, so its own D(θ_A, θ_B) is small and its own T large by construction; the strategy's own
T would correlate with its LRs whatever the layers are worth. Full fine-tuning moves every
layer with one LR, the paper's reference.

Only where the rates spread: a correlation of ranks does not care how far apart the rates are,
so rates 1.000 and 1.002 (a learned LR that barely moved, ``hd`` at the reference β) would be
ranked as if they differed. The correlation is computed only where the final group LRs (the
last logged ``lr/<group>``, mean over seeds, over the layer groups that have a T) spread by at
least :data:`SPREAD_MIN` (max/min); otherwise the report says the rates did not move and gives
the spread.

θ_r: the run param ``transferability_reference`` says whether T was measured against the
pre-training's own random start (``pretrain_start``, the paper's definition) or an independent
random draw (``random_draw``: external weights, or runs of an earlier version, which logged no
such param); :func:`reference_labels` words it per dataset and the figure carries it.

p-values: exact (all n! pairings) for up to :data:`EXACT_MAX_GROUPS` layer groups, where the
t-approximation of ``scipy.stats.spearmanr`` is far off (4 groups with ρ = −1: exact p = 0.083,
t-approximation p = 0); with 4 groups no p falls below 0.05, with 5 the smallest is 0.017.

Torch-free (import-linter: reports never import torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

PREFIX = "transferability/"
MEAN_BACKBONE = "mean_backbone"
#: the strategy whose T is the reference the LRs are set against (the paper's)
REFERENCE = "full"
ALPHA = 0.05
#: fewest layer groups a rank correlation is computed on
MIN_GROUPS = 3
#: max/min of the final group LRs from which the rates count as spread (a correlation is
#: computed); the "Did each strategy act?" table uses the same threshold
SPREAD_MIN = 1.1
#: what θ_r was (run param ``transferability_reference``)
REFERENCE_PARAM = "param.transferability_reference"
REFERENCE_WORDS = {
    "pretrain_start": "θ_r = the pre-training's own random start",
    "random_draw": "θ_r = an independent random draw (the source's start is unknown)",
}
#: up to this many groups the p-value is exact (9! = 362,880 pairings, under a second)
EXACT_MAX_GROUPS = 9


def transferability_table(results: pd.DataFrame) -> pd.DataFrame:
    """Long format ``run_id, group, transferability`` from the final ``transferability/<group>``
    metrics (``mean_backbone`` left out)."""
    cols = [c for c in results.columns
            if c.startswith(PREFIX) and c != PREFIX + MEAN_BACKBONE]
    if results.empty or not cols:
        return pd.DataFrame(columns=["run_id", "group", "transferability"])
    long = results.melt(id_vars=["run_id"], value_vars=cols, var_name="group",
                        value_name="transferability")
    long["group"] = long["group"].str.removeprefix(PREFIX)
    return long.dropna(subset=["transferability"]).reset_index(drop=True)


def missing_reason(results: pd.DataFrame, trans: pd.DataFrame) -> str | None:
    """Why there is no transferability at all (None when there is some)."""
    if not trans.empty:
        return None
    weights = set(results["param.weights"].dropna()) if "param.weights" in results else set()
    if weights == {"none"}:
        return ("No transferability: every run started from random weights (`model.weights: "
                "none`). Transferability compares a pre-trained start with a random one, so it "
                "needs pre-trained weights (`weights: pretrain`, `imagenet` or a checkpoint).")
    return ("No `transferability/<group>` metric was logged: either every run froze all of its "
            "backbone (a group that does not move has no T) or the runs come from a version of "
            "metalr-bench that did not measure it.")


def mean_lrs(hist: pd.DataFrame) -> pd.DataFrame:
    """Per run and layer group, the mean LR over training (``lr/<group>`` histories with the
    cell columns, see ``results.with_cell``), the last logged one, and whether it changed
    during training:
    ``run_id, dataset_key, strategy_label, seed, group, mean_lr, final_lr, changed``."""
    cols = ["run_id", "dataset_key", "strategy_label", "seed", "group", "mean_lr", "final_lr",
            "changed"]
    if hist.empty:
        return pd.DataFrame(columns=cols)
    lr = hist[hist["key"].str.startswith("lr/")].copy()
    if lr.empty:
        return pd.DataFrame(columns=cols)
    lr["group"] = lr["key"].str.removeprefix("lr/")
    lr = lr.sort_values("step", kind="stable")
    agg = lr.groupby(["run_id", "dataset_key", "strategy_label", "seed", "group"])["value"].agg(
        mean_lr="mean", final_lr="last", changed=lambda v: _distinct(v) > 1)
    return agg.reset_index()[cols]


def _distinct(values: pd.Series | np.ndarray) -> int:
    """Distinct values up to a relative 1e-9 (float noise of a logged LR is not a difference)."""
    v = np.asarray(values, dtype=float)
    top = np.nanmax(np.abs(v)) if len(v) else 0.0
    return len(np.unique(np.round(v / top, 9))) if top > 0 else int(len(v) > 0)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, str]:
    """``(rho, p, test)``: Spearman's ρ and its two-sided p; exact over all pairings up to
    :data:`EXACT_MAX_GROUPS` points, else ``scipy.stats.spearmanr``'s t-approximation."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < MIN_GROUPS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, "no test"
    res = stats.spearmanr(x, y)
    rho = float(res.statistic)
    if len(x) > EXACT_MAX_GROUPS:
        return rho, float(res.pvalue), "t-approximation"
    a = stats.rankdata(x)
    a = a - a.mean()

    def pearson_of_ranks(b: np.ndarray, axis: int = -1) -> np.ndarray:
        b = b - b.mean(axis=axis, keepdims=True)
        return (a * b).sum(axis=axis) / np.sqrt((a * a).sum() * (b * b).sum(axis=axis))

    exact = stats.permutation_test((stats.rankdata(y),), pearson_of_ranks,
                                   permutation_type="pairings", n_resamples=np.inf,
                                   vectorized=True, alternative="two-sided")
    return rho, float(exact.pvalue), "exact"


def verdict(rho: float, p: float, alpha: float = ALPHA) -> str:
    """The wording rule: p < α and ρ < 0: anti-correlated; p < α and ρ > 0: correlated;
    otherwise (p ≥ α, or no test): not significantly correlated. Not "uncorrelated": with 4
    groups even ρ = −1 has p = 0.083, and calling that uncorrelated would misread it."""
    if math.isnan(p) or p >= alpha:
        return "not significantly correlated"
    return "anti-correlated" if rho < 0 else "correlated"


def spread(lrs: Sequence[float]) -> float:
    """max/min of the positive learning rates (NaN with none): how far apart the rates are."""
    v = np.asarray(lrs, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return float(v.max() / v.min()) if len(v) else math.nan


def reference_labels(results: pd.DataFrame) -> dict[str, str]:
    """Per dataset, what θ_r was in its runs' T (:data:`REFERENCE_WORDS`); runs without the
    param (an earlier version) used a random draw. Mixed runs are said to be mixed."""
    out: dict[str, str] = {}
    if results.empty:
        return out
    refs = (results[REFERENCE_PARAM] if REFERENCE_PARAM in results
            else pd.Series(None, index=results.index))
    has_t = results[[c for c in results.columns if c.startswith(PREFIX)]].notna().any(axis=1)
    for ds, r in refs[has_t].fillna("random_draw").groupby(results.loc[has_t, "dataset_key"]):
        kinds = sorted(set(r))
        out[str(ds)] = (REFERENCE_WORDS.get(kinds[0], f"θ_r = {kinds[0]}") if len(kinds) == 1
                        else "θ_r mixed: " + ", ".join(kinds) + " (runs of several versions)")
    return out


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def sentence(dataset: str, strategy: str, learned: bool, rho: float, p: float, test: str,
             n: int) -> str:
    """The one line a reader can check against the table and the figure."""
    lrs = "learned LRs" if learned else "per-layer LRs (fixed during training)"
    how = "exact p" if test == "exact" else "t-approximation"
    return (f"On {dataset}, {strategy}'s {lrs} are {verdict(rho, p)} with transferability "
            f"(ρ = {rho:.2f}, p = {_p(p)}; Spearman over {n} layer groups, {how}, "
            f"T of full fine-tuning).")


@dataclass
class LrTransferability:
    """The comparison: one row per (dataset, strategy) correlated, the points behind it, and
    why it could not be made where it could not."""

    correlations: pd.DataFrame  # dataset_key, strategy_label, n_groups, rho, p, test, verdict,
    #                             learned, sentence
    points: pd.DataFrame  # dataset_key, strategy_label, group, transferability, mean_lr
    notes: list[str]


def lr_against_transferability(trans: pd.DataFrame, lrs: pd.DataFrame,
                               groups: Sequence[str] = ()) -> LrTransferability:
    """Per dataset and layer-wise strategy: mean LR per group against full fine-tuning's T.

    ``trans``: :func:`transferability_table` with the cell columns; ``lrs``: :func:`mean_lrs`;
    ``groups``: the input -> output order (``results.group_order``) the points follow.
    """
    order = {g: i for i, g in enumerate(groups)}
    rows, points, notes = [], [], []
    per_group = (lrs.groupby(["dataset_key", "strategy_label", "group"])
                 .agg(mean_lr=("mean_lr", "mean"), final_lr=("final_lr", "mean"),
                      changed=("changed", "any")).reset_index())
    layerwise = {key for key, g in per_group.groupby(["dataset_key", "strategy_label"])
                 if _distinct(g["mean_lr"]) > 1}
    if not layerwise:
        notes.append("No strategy in this benchmark gives its layer groups different learning "
                     "rates (no run's `lr/<group>` values differ across groups), so there are "
                     "no per-layer learning rates to set against transferability.")
    reference = (trans[trans["strategy"] == REFERENCE]
                 .groupby(["dataset_key", "group"])["transferability"].mean())
    for ds in sorted(set(trans["dataset_key"])):
        mine = sorted(s for d, s in layerwise if d == ds)
        if layerwise and not mine:
            notes.append(f"On {ds}: no strategy gives its layer groups different learning "
                         "rates, so there is nothing to correlate.")
            continue
        if mine and ds not in reference.index.get_level_values(0):
            notes.append(f"On {ds}: no full fine-tuning run, whose T is the reference (a "
                         "strategy's own T follows its own LRs: a group with a small LR barely "
                         "moves, so its T is high by construction); no correlation.")
            continue
        for s in mine:
            g = per_group[(per_group["dataset_key"] == ds) & (per_group["strategy_label"] == s)]
            t = reference.loc[ds]
            g = g[g["group"].isin(t.index)]
            g = g.assign(transferability=t.reindex(g["group"]).to_numpy())
            g = g.sort_values("group", key=lambda c: c.map(lambda n: order.get(n, len(order))))
            n = len(g)
            if n < MIN_GROUPS:
                notes.append(f"On {ds}, {s}: only {n} layer group(s) have both a learning rate "
                             f"and a T of full fine-tuning; a rank correlation needs at least "
                             f"{MIN_GROUPS}.")
                continue
            if _distinct(g["mean_lr"]) < 2:
                notes.append(f"On {ds}, {s}: the same learning rate on every layer group that "
                             "has a T (only the head's differs); no rank correlation.")
                continue
            final_spread = spread(g["final_lr"])
            if not final_spread >= SPREAD_MIN:
                notes.append(f"On {ds}, {s}: the rates did not move apart (final spread "
                             f"{final_spread:.3f}× across the layer groups that have a T, max/"
                             f"min, under {SPREAD_MIN}×); no rank correlation.")
                continue
            rho, p, test = spearman(g["transferability"], g["mean_lr"])
            learned = bool(g["changed"].any())
            rows.append({"dataset_key": ds, "strategy_label": s, "n_groups": n, "rho": rho,
                         "p": p, "test": test, "verdict": verdict(rho, p), "learned": learned,
                         "sentence": sentence(ds, s, learned, rho, p, test, n)})
            points.append(g[["dataset_key", "strategy_label", "group", "transferability",
                             "mean_lr"]])
    corr_cols = ["dataset_key", "strategy_label", "n_groups", "rho", "p", "test", "verdict",
                 "learned", "sentence"]
    return LrTransferability(
        pd.DataFrame(rows, columns=corr_cols),
        pd.concat(points, ignore_index=True) if points else pd.DataFrame(
            columns=["dataset_key", "strategy_label", "group", "transferability", "mean_lr"]),
        notes,
    )


def correlations_html(corr: pd.DataFrame) -> str:
    """The correlations as ``<table id="lr-transferability">``."""
    shown = pd.DataFrame({
        "dataset": corr["dataset_key"], "strategy": corr["strategy_label"],
        "layer groups": corr["n_groups"], "Spearman ρ": corr["rho"].map("{:.2f}".format),
        "p": corr["p"].map(_p), "p-value": corr["test"], "reading": corr["verdict"],
    })
    return shown.to_html(index=False, table_id="lr-transferability", classes="metalr-table",
                         border=0)

