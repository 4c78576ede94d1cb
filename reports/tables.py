"""The report's HTML tables: leaderboard, average ranks, paired tests.

Why hand-built HTML (``DataFrame.to_html`` with a fixed ``table_id``): the tables must survive
nbconvert with code hidden and stay machine-readable; tests (and users) find them by id
(``leaderboard``, ``average-rank``, ``paired-tests``) and parse ``mean ± std [lo, hi]`` cells.
"""

from __future__ import annotations

import html
import math

import pandas as pd
from metalr_bench.reports.stats import PairedTest, mean_ci, paired_test, ranks

METRIC_NAMES = {"test_auc": "AUC", "test_acc": "accuracy", "test_balanced_acc": "balanced acc.",
                "test_f1": "F1"}
#: metrics that live in [0, 1] (their confidence intervals are clipped to it)
BOUNDED = frozenset(METRIC_NAMES)
CSS = """
<style>
table.metalr-table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1em 0; }
table.metalr-table th, table.metalr-table td { padding: 4px 10px; border-bottom: 1px solid #ddd;
  text-align: right; white-space: nowrap; }
table.metalr-table th { background: #f3f5f8; text-align: center; }
table.metalr-table td:first-child, table.metalr-table td:nth-child(2) { text-align: left; }
table.metalr-table strong { color: #0b4f9c; }
table.metalr-table .ci { color: #666; font-size: 11px; }
</style>
"""


def fmt_cell(mean: float, std: float, lo: float, hi: float, digits: int = 3) -> str:
    """``0.912 ± 0.010 [0.890, 0.934]``; std and CI omitted for a single seed."""
    if math.isnan(mean):
        return "–"
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _cell_html(mean: float, std: float, lo: float, hi: float, bold: bool) -> str:
    """``mean ± std`` on one line, the CI below in grey; the text reads as :func:`fmt_cell`."""
    text = fmt_cell(mean, std, lo, hi)
    head, _, ci = text.partition(" [")
    head = f"<strong>{html.escape(head)}</strong>" if bold else html.escape(head)
    return head + (f'<br/><span class="ci"> [{html.escape(ci)}</span>' if ci else "")


def _shown(g: pd.DataFrame, column: str) -> str:
    """A cell's value over its seeds: one value, or the distinct ones (older runs: ``–``)."""
    if column not in g:
        return "–"
    values = sorted({str(v) for v in g[column].dropna()})
    return "/".join(values) if values else "–"


def leaderboard(results: pd.DataFrame, metrics: list[str], primary: str,
                level: float = 0.95) -> pd.DataFrame:
    """Numbers per (dataset, strategy): ``<metric>_{mean,std,ci_low,ci_high}``, n, rank."""
    rows = []
    for (ds, s), g in results.groupby(["dataset_key", "strategy_label"], sort=True):
        row = {"dataset": ds, "strategy": s, "n_seeds": int(g["seed"].nunique()),
               "train_images": _shown(g, "param.n_train_images"),
               "meta_source": _shown(g, "param.meta_source")}
        for m in metrics:
            mean, std, lo, hi, _ = mean_ci(g[m] if m in g else [], level)
            if m in BOUNDED:  # a t-interval from 2-3 seeds can leave [0, 1]: clip it
                lo, hi = max(lo, 0.0), min(hi, 1.0)
            row |= {f"{m}_mean": mean, f"{m}_std": std, f"{m}_ci_low": lo, f"{m}_ci_high": hi}
        rows.append(row)
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    board["rank"] = board.groupby("dataset")[f"{primary}_mean"].rank(ascending=False,
                                                                     method="average")
    return board.sort_values(["dataset", "rank", "strategy"], ignore_index=True)


def leaderboard_html(board: pd.DataFrame, metrics: list[str], primary: str) -> str:
    """The leaderboard as ``<table id="leaderboard">``, best mean per dataset+metric in bold."""
    shown = pd.DataFrame({"dataset": board["dataset"], "strategy": board["strategy"],
                          "seeds": board["n_seeds"],
                          "train images": board.get("train_images", "–"),
                          "meta source": board.get("meta_source", "–")})
    for m in metrics:
        best = board.groupby("dataset")[f"{m}_mean"].transform("max")
        cells = []
        for _, r in board.iterrows():
            is_best = not math.isnan(r[f"{m}_mean"]) and r[f"{m}_mean"] == best[r.name]
            cells.append(_cell_html(r[f"{m}_mean"], r[f"{m}_std"], r[f"{m}_ci_low"],
                                    r[f"{m}_ci_high"], is_best))
        shown[METRIC_NAMES.get(m, m)] = cells
    shown[f"rank ({METRIC_NAMES.get(primary, primary)})"] = [f"{v:g}" for v in board["rank"]]
    return shown.to_html(index=False, escape=False, table_id="leaderboard",
                         classes="metalr-table", border=0)


def average_ranks(board: pd.DataFrame, primary: str) -> pd.DataFrame:
    """Strategies x datasets ranks on ``primary`` (mean over seeds), plus the average rank."""
    scores = board.pivot(index="dataset", columns="strategy", values=f"{primary}_mean")
    r = ranks(scores).T  # strategy x dataset
    r.columns.name = None
    r.insert(0, "average rank", r.mean(axis=1))
    r.insert(1, "datasets", r.iloc[:, 1:].notna().sum(axis=1))
    return r.sort_values("average rank")


def average_ranks_html(table: pd.DataFrame) -> str:
    shown = table.copy()
    shown.index.name = "strategy"
    best = shown["average rank"].min()
    shown["average rank"] = [f"<strong>{v:.2f}</strong>" if v == best else f"{v:.2f}"
                             for v in shown["average rank"]]
    for c in shown.columns[2:]:
        shown[c] = [f"{v:g}" if not math.isnan(v) else "–" for v in shown[c]]
    return shown.reset_index().to_html(index=False, escape=False, table_id="average-rank",
                                       classes="metalr-table", border=0)


def paired_vs_best(results: pd.DataFrame, board: pd.DataFrame, primary: str) -> pd.DataFrame:
    """Per dataset: each strategy vs the best one (by mean ``primary``), paired on seeds."""
    rows = []
    for ds, b in board.groupby("dataset"):
        best = b.sort_values("rank").iloc[0]["strategy"]
        sub = results[results["dataset_key"] == ds]
        ref = sub[sub["strategy_label"] == best].set_index("seed")[primary]
        for s in b.sort_values("rank")["strategy"]:
            if s == best:
                continue
            other = sub[sub["strategy_label"] == s].set_index("seed")[primary]
            t: PairedTest = paired_test(other, ref)
            rows.append({"dataset": ds, "strategy": s, "best": best, "mean diff": t.mean_diff,
                         "test": t.test, "statistic": t.statistic, "p-value": t.p_value,
                         "pairs": t.n_pairs})
    return pd.DataFrame(rows, columns=["dataset", "strategy", "best", "mean diff", "test",
                                       "statistic", "p-value", "pairs"])


def paired_html(table: pd.DataFrame) -> str:
    shown = table.copy()
    shown["mean diff"] = [f"{v:+.3f}" for v in shown["mean diff"]]
    shown["statistic"] = [f"{v:.3f}" if not math.isnan(v) else "–" for v in shown["statistic"]]
    shown["p-value"] = [("–" if math.isnan(v) else f"<strong>{v:.3g}</strong>" if v < 0.05
                         else f"{v:.3g}") for v in shown["p-value"]]
    return shown.to_html(index=False, escape=False, table_id="paired-tests",
                         classes="metalr-table", border=0)
