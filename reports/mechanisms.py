"""Did each strategy act? The figure that shows a strategy's mechanism did something, in words.

A leaderboard row is only worth reading if the strategy behind it did what its paper does: a
regulariser whose penalty is 0.001 % of the loss is plain fine-tuning, a learned learning rate
that moves by 0.2 % is one fixed rate. Every strategy names the metric that shows its mechanism
(``Strategy.mechanism``, logged by the run as the MLflow tag ``mechanism``; the metric itself is
logged every epoch, MLflow step = epoch). Per dataset and strategy this module takes that
metric's first and last logged value (per run, then the mean over seeds and folds) and words a
verdict by the metric's kind:

* ``<name>/penalty_share`` (L2-SP, DELTA, BSS: penalty / (task loss + penalty)): the share at
  the end ("acts: 3 % of the loss at the end"), "dominates the loss at the start" when the share
  is at least 50 % at the first epoch, "negligible" below 0.01 %;
* ``lr_spread`` (max/min of the positive per-group learning rates): "rates moved: spread
  1.0× → 2.4×", "fixed spread 13× (by design)" for rates that spread but did not change, "rates
  did not move (spread 1.002×)" below :data:`SPREAD_MIN` (the same threshold under which the
  report computes no LR-vs-transferability correlation);
* ``trainable_share`` (trained parameters / all parameters): "trains 12 % of the parameters";
* ``lp_ft/probe_train_loss``: "probe converged to 0.05" (the linear probe's training loss at
  its end).

A strategy without a tag (``full``) is listed as "no mechanism to show". Pure pandas (the report
template renders it; the import contract keeps torch out of reports).
"""

from __future__ import annotations

import math

import pandas as pd

#: the run tag naming the metric (``benchmark.tracking.tags.MECHANISM``)
TAG = "mechanism"
#: max/min of the group learning rates under which the rates count as not spread (also the
#: threshold of the LR-vs-transferability correlation, ``reports.transferability``)
SPREAD_MIN = 1.1
#: a penalty share at or above this at the first epoch dominates the loss
DOMINATES = 0.5
#: a penalty share below this (0.01 %) is negligible
NEGLIGIBLE = 1e-4
#: relative change below which a spread or a share counts as unchanged
UNCHANGED = 0.01

COLUMNS = ["dataset_key", "strategy_label", "figure", "start", "end", "n_runs", "verdict"]


def _percent(share: float) -> str:
    """3 %, 0.25 %, 0.004 %: enough digits to read a small share."""
    pct = 100 * share
    if pct >= 1:
        return f"{pct:.0f} %"
    if pct >= 0.01:
        return f"{pct:.2g} %"
    return f"{pct:.1g} %"


def _times(x: float) -> str:
    """A spread: 13×, 2.4×, 1.0×, 1.002× (three decimals only where one would hide a move)."""
    if x >= 10:
        return f"{x:.0f}×"
    if x >= SPREAD_MIN or abs(x - round(x, 1)) < 5e-4:
        return f"{x:.1f}×"
    return f"{x:.3f}×"


def _same(a: float, b: float) -> bool:
    return abs(b - a) <= UNCHANGED * max(abs(a), abs(b))


def verdict(figure: str, start: float, end: float) -> str:
    """The verdict in words for ``figure``'s first and last value (module docstring)."""
    if math.isnan(start) or math.isnan(end):
        return f"`{figure}` was not logged"
    if figure.endswith("/penalty_share"):
        if max(start, end) < NEGLIGIBLE:
            return f"negligible: under {_percent(NEGLIGIBLE)} of the loss"
        parts = []
        if start >= DOMINATES:
            parts.append(f"dominates the loss at the start ({_percent(start)})")
        if end < NEGLIGIBLE:
            parts.append(f"negligible at the end ({_percent(end)} of the loss)")
        else:
            parts.append(f"acts: {_percent(end)} of the loss at the end")
        return "; ".join(parts)
    if figure == "lr_spread":
        if max(start, end) < SPREAD_MIN:
            return f"rates did not move (spread {_times(end)})"
        if _same(start, end):
            return f"fixed spread {_times(end)} (by design)"
        return f"rates moved: spread {_times(start)} → {_times(end)}"
    if figure == "trainable_share":
        if _same(start, end):
            return f"trains {_percent(end)} of the parameters"
        return f"trains {_percent(start)} of the parameters at the start, {_percent(end)} at the end"
    if figure == "wise_ft/alpha":  # chosen once, at the end
        if end <= 0:
            return "α* = 0: kept the starting model (fine-tuning did not help on validation)"
        if end >= 1:
            return "α* = 1: kept the fine-tuned model (no interpolation)"
        return f"interpolated: α* = {end:.2g} between the starting and the fine-tuned model"
    if figure == "sam/sharpness":
        return f"sharpness L(w+ε) − L(w) {start:.2g} → {end:.2g}"
    if figure.endswith("/probe_train_loss"):  # lp_ft's first phase, linear_probe
        return f"probe converged to {end:.2g}"
    return f"{start:.3g} → {end:.3g}"


def first_last(hist: pd.DataFrame) -> pd.DataFrame:
    """Per run and key: the value at the first and at the last logged step
    (``run_id, key, start, end``) from a long ``run_id, key, step, value`` history."""
    if hist.empty:
        return pd.DataFrame(columns=["run_id", "key", "start", "end"])
    ordered = hist.sort_values(["run_id", "key", "step"], kind="stable")
    g = ordered.groupby(["run_id", "key"])["value"]
    return pd.DataFrame({"start": g.first(), "end": g.last()}).reset_index()


def mechanism_table(results: pd.DataFrame, hist: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, strategy): the figure its runs' ``mechanism`` tag names, its first
    and last value (mean over the runs: seeds, and folds where the dataset is a fold), how many
    runs logged it, and the verdict.

    ``results``: one row per run with ``run_id, dataset_key, strategy_label`` and the tag column
    ``mechanism`` (absent, empty or NaN: no mechanism); ``hist``: long ``run_id, key, step,
    value`` histories holding at least the named metrics.
    """
    if results.empty:
        return pd.DataFrame(columns=COLUMNS)
    tags = results[TAG] if TAG in results else pd.Series(None, index=results.index)
    runs = results.assign(**{TAG: [t if isinstance(t, str) and t else None for t in tags]})
    ends = first_last(hist)
    rows = []
    for (ds, label), g in runs.groupby(["dataset_key", "strategy_label"], sort=True):
        names = sorted(set(g[TAG].dropna()))
        if not names:
            rows.append({"dataset_key": ds, "strategy_label": label, "figure": "",
                         "start": math.nan, "end": math.nan, "n_runs": 0,
                         "verdict": "no mechanism to show"})
            continue
        for name in names:  # one, unless runs of several versions disagree
            mine = ends[(ends["key"] == name)
                        & ends["run_id"].isin(g.loc[g[TAG] == name, "run_id"])]
            start = float(mine["start"].mean()) if len(mine) else math.nan
            end = float(mine["end"].mean()) if len(mine) else math.nan
            rows.append({"dataset_key": ds, "strategy_label": label, "figure": name,
                         "start": start, "end": end, "n_runs": len(mine),
                         "verdict": verdict(name, start, end)})
    return pd.DataFrame(rows, columns=COLUMNS)


def mechanism_keys(results: pd.DataFrame) -> list[str]:
    """The metric names the runs' ``mechanism`` tags name (the histories to read)."""
    if TAG not in results:
        return []
    return sorted({t for t in results[TAG] if isinstance(t, str) and t})


def _value(figure: str, x: float) -> str:
    if math.isnan(x):
        return "–"
    if figure.endswith("_share"):
        return _percent(x)
    if figure == "lr_spread":
        return _times(x)
    return f"{x:.3g}"


def mechanism_html(table: pd.DataFrame) -> str:
    """The table as ``<table id="mechanisms">``: dataset, strategy, figure, start, end, verdict."""
    shown = pd.DataFrame({
        "dataset": table["dataset_key"], "strategy": table["strategy_label"],
        "figure": [f or "–" for f in table["figure"]],
        "start": [_value(f, x) for f, x in zip(table["figure"], table["start"], strict=True)],
        "end": [_value(f, x) for f, x in zip(table["figure"], table["end"], strict=True)],
        "verdict": table["verdict"],
    })
    return shown.to_html(index=False, table_id="mechanisms", classes="metalr-table", border=0)
