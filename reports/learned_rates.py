"""What learning the rates buys: MetaLR against its control, ``discriminative``.

MetaLR starts from a fixed backbone/head learning-rate ratio, pins the head for a while, then
learns the rates. "metalr vs full" therefore mixes two things: the starting ratio (the classic
"smaller LR for the pre-trained layers") and the hyper-gradient. ``discriminative`` keeps
MetaLR's starting per-group rates, head pin and schedule without the hyper-gradient, so the
paired difference metalr − discriminative on the primary metric is what learning the rates
buys on that dataset.

Paired, as everywhere in the report (``reports.stats``): on seeds for a dataset, on (fold, seed)
for the folds of a cross-validated dataset pooled (``cv_key``). The mean difference comes with a
t-interval over the pairs, and the test :func:`stats.paired_test` ran (paired t-test below 6
pairs, Wilcoxon signed-rank from 6) with its p. Pure pandas/scipy.
"""

from __future__ import annotations

import math

import pandas as pd
from metalr_bench.reports import stats

#: the strategy whose learned rates are judged, and its control
LEARNED = "metalr"
CONTROL = "discriminative"
ALPHA = 0.05

COLUMNS = ["dataset", "metalr", "control", "metric", "mean_diff", "ci_low", "ci_high",
           "n_pairs", "paired_on", "test", "p", "sentence"]


def _signed(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.3f}"


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def sentence(row: dict, level: float) -> str:
    """One line: the difference, its interval, the test, p, and what it means at α = 0.05."""
    d, lo, hi, p = row["mean_diff"], row["ci_low"], row["ci_high"], row["p"]
    on = " × ".join(row["paired_on"])
    pairs = f"{row['n_pairs']} {'(fold, seed) pairs' if len(row['paired_on']) > 1 else 'seeds'}"
    ci = (f"{level:.0%} CI {_signed(lo)} to {_signed(hi)}" if not math.isnan(lo)
          else "no CI with one pair")
    if math.isnan(p) or p >= ALPHA:
        reading = "not significantly different from the fixed starting rates"
    else:
        reading = "better than" if d > 0 else "worse than"
        reading = f"significantly {reading} the fixed starting rates"
    test = (row["test"] if row["test"].startswith("no test")
            else f"{row['test']} over {pairs}, paired on {on}, p = {_p(p)}")
    return (f"On {row['dataset']}, learning the rates ({row['metalr']} − {row['control']}) "
            f"changes {row['metric']} by {_signed(d)} ({ci}; {test}): {reading}.")


def learned_rates_gain(results: pd.DataFrame, metric: str, level: float = 0.95
                       ) -> pd.DataFrame:
    """Per dataset (``dataset_key``, and ``cv_key`` for the folds of a cross-validated dataset
    pooled) that has runs of both ``metalr`` and ``discriminative`` (by the ``strategy``
    column, each strategy label of them paired with each of the other's): the paired difference
    metalr − discriminative on ``metric``."""
    rows: list[dict] = []
    if results.empty or "strategy" not in results or metric not in results:
        return pd.DataFrame(columns=COLUMNS)
    levels: list[tuple[str, tuple[str, ...]]] = [("dataset_key", ("seed",))]
    if "cv_key" in results and results["cv_key"].notna().any():
        levels.append(("cv_key", ("fold", "seed")))
    for by, pair_on in levels:
        sub_all = results[results[by].notna()]
        for ds, sub in sub_all.groupby(by, sort=True):
            learned = sorted(set(sub.loc[sub["strategy"] == LEARNED, "strategy_label"]))
            controls = sorted(set(sub.loc[sub["strategy"] == CONTROL, "strategy_label"]))
            for a in learned:
                for b in controls:
                    x = sub[sub["strategy_label"] == a].set_index(list(pair_on))[metric]
                    y = sub[sub["strategy_label"] == b].set_index(list(pair_on))[metric]
                    both = pd.concat([x.rename("a"), y.rename("b")], axis=1,
                                     join="inner").dropna()
                    test = stats.paired_test(x, y)
                    mean, _, lo, hi, n = stats.mean_ci(both["a"] - both["b"], level)
                    row = {"dataset": ds, "metalr": a, "control": b, "metric": metric,
                           "mean_diff": mean, "ci_low": lo, "ci_high": hi, "n_pairs": n,
                           "paired_on": pair_on, "test": test.test, "p": test.p_value}
                    row["sentence"] = sentence(row, level)
                    rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def missing_control(results: pd.DataFrame) -> list[str]:
    """Datasets with ``metalr`` runs but no ``discriminative`` run (the control is missing)."""
    if results.empty or "strategy" not in results:
        return []
    out = []
    for ds, sub in results.groupby("dataset_key", sort=True):
        have = set(sub["strategy"])
        if LEARNED in have and CONTROL not in have:
            out.append(str(ds))
    return out
