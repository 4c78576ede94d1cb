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
                level: float = 0.95, *, by: str = "dataset_key") -> pd.DataFrame:
    """Numbers per (dataset, strategy): ``<metric>_{mean,std,ci_low,ci_high}``, n, rank.

    ``by="cv_key"``: per cross-validated dataset, over its folds × seeds (``n_runs``)."""
    rows = []
    for (ds, s), g in results.groupby([by, "strategy_label"], sort=True):
        row = {"dataset": ds, "strategy": s, "n_seeds": int(g["seed"].nunique()),
               "n_runs": len(g),
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


def mixed_code_warning(results: pd.DataFrame) -> str | None:
    """A warning when one leaderboard mixes runs of different code, else None.

    Each run logs ``code_fingerprint`` (its strategy's code plus the shared code) and
    ``code_fingerprint.shared`` (the loop, data, models and strategy core alone). A strategy
    with several fingerprints, or several shared fingerprints across the table, means cells
    were computed by different code: their numbers are not comparable. Runs of versions
    that logged no fingerprint count as one unknown version."""
    if results.empty:
        return None
    col = "code_fingerprint"

    def versions(g: pd.DataFrame, column: str) -> list[str]:
        if column not in g:
            return ["unknown"]
        return sorted({"unknown" if v is None or v != v else str(v) for v in g[column]})

    notes = []
    shared = versions(results, f"{col}.shared")
    if len(shared) > 1:
        notes.append(f"the shared code (training loop, data, models, strategy core) comes in "
                     f"{len(shared)} code versions ({', '.join(shared)})")
    for label, g in results.groupby("strategy_label", sort=True):
        own = versions(g, col)
        if len(own) > 1:
            notes.append(f"{label}: {len(own)} code versions ({', '.join(own)})")
    if not notes:
        return None
    return ("This leaderboard mixes runs computed by different code, so their numbers may not "
            "be comparable: " + "; ".join(notes) + ". Re-run the older cells (`run-benchmark` "
            "re-runs every cell whose code changed) and report on that parent run.")


def leaderboard_html(board: pd.DataFrame, metrics: list[str], primary: str,
                     table_id: str = "leaderboard") -> str:
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
    return shown.to_html(index=False, escape=False, table_id=table_id,
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


def paired_vs_best(results: pd.DataFrame, board: pd.DataFrame, primary: str, *,
                   by: str = "dataset_key", pair_on: tuple[str, ...] = ("seed",)
                   ) -> pd.DataFrame:
    """Per dataset: each strategy vs the best one (by mean ``primary``), paired on seeds (a
    cross-validated dataset, ``by="cv_key"``: paired on (fold, seed))."""
    rows = []
    for ds, b in board.groupby("dataset"):
        best = b.sort_values("rank").iloc[0]["strategy"]
        sub = results[results[by] == ds]
        ref = sub[sub["strategy_label"] == best].set_index(list(pair_on))[primary]
        for s in b.sort_values("rank")["strategy"]:
            if s == best:
                continue
            other = sub[sub["strategy_label"] == s].set_index(list(pair_on))[primary]
            t: PairedTest = paired_test(other, ref)
            rows.append({"dataset": ds, "strategy": s, "best": best, "mean diff": t.mean_diff,
                         "test": t.test, "statistic": t.statistic, "p-value": t.p_value,
                         "pairs": t.n_pairs})
    return pd.DataFrame(rows, columns=["dataset", "strategy", "best", "mean diff", "test",
                                       "statistic", "p-value", "pairs"])


def paired_html(table: pd.DataFrame, table_id: str = "paired-tests") -> str:
    shown = table.copy()
    shown["mean diff"] = [f"{v:+.3f}" for v in shown["mean diff"]]
    shown["statistic"] = [f"{v:.3f}" if not math.isnan(v) else "–" for v in shown["statistic"]]
    shown["p-value"] = [("–" if math.isnan(v) else f"<strong>{v:.3g}</strong>" if v < 0.05
                         else f"{v:.3g}") for v in shown["p-value"]]
    return shown.to_html(index=False, escape=False, table_id=table_id,
                         classes="metalr-table", border=0)


# -- cross-validation: the folds pooled ------------------------------------------------------------
def pooled_cv(results: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """Per (cross-validated dataset, strategy, seed): the paper's figures on the test
    predictions of all its folds pooled (every image of the dataset predicted once, by the fold
    that held it out): accuracy, macro AUC, and precision / recall / F1 per class.

    ``predictions``: :func:`results.test_predictions` of ``results`` (single-label tasks)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    if predictions.empty or "label" not in predictions:
        return pd.DataFrame()
    probs = [c for c in predictions if c.startswith("prob.")]
    classes = [c.removeprefix("prob.") for c in probs]
    merged = predictions.merge(results[["run_id", "cv_key", "strategy_label", "seed"]],
                               on="run_id")
    rows = []
    for (ds, s, seed), g in merged.groupby(["cv_key", "strategy_label", "seed"], sort=True):
        y = g["label"].to_numpy(dtype=int)
        p = g[probs].to_numpy(dtype=float)
        pred = p.argmax(axis=1)
        row = {"dataset": ds, "strategy": s, "seed": seed, "n_images": len(g),
               "n_folds": int(results.loc[results["run_id"].isin(g["run_id"]), "fold"].nunique()),
               "pooled_acc": accuracy_score(y, pred)}
        present = sorted(set(y))
        try:
            row["pooled_auc"] = (roc_auc_score(y, p[:, 1]) if len(classes) == 2 else
                                 roc_auc_score(y, p, multi_class="ovr", labels=range(len(classes))))
        except ValueError:  # one class only among the pooled labels
            row["pooled_auc"] = math.nan
        prec, rec, f1, _ = precision_recall_fscore_support(
            y, pred, labels=range(len(classes)), zero_division=0)
        for i, c in enumerate(classes):
            if i in present:
                row |= {f"precision.{c}": prec[i], f"recall.{c}": rec[i], f"f1.{c}": f1[i]}
        rows.append(row)
    return pd.DataFrame(rows)


def pooled_cv_html(pooled: pd.DataFrame) -> str:
    """Mean ± std over seeds of each pooled figure, per dataset and strategy."""
    figures = [c for c in pooled if c.startswith(("pooled_", "precision.", "recall.", "f1."))]
    rows = []
    for (ds, s), g in pooled.groupby(["dataset", "strategy"], sort=True):
        row = {"dataset": ds, "strategy": s, "seeds": g["seed"].nunique(),
               "folds": int(g["n_folds"].max()), "images": int(g["n_images"].max())}
        for c in figures:
            v = g[c].dropna()
            row[c.replace("pooled_", "pooled ")] = (
                "–" if v.empty else f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}"
                                                          if len(v) > 1 else ""))
        rows.append(row)
    return pd.DataFrame(rows).to_html(index=False, escape=True, table_id="cv-pooled",
                                      classes="metalr-table", border=0)


def confusion(results: pd.DataFrame, predictions: pd.DataFrame) -> dict[tuple[str, str],
                                                                           pd.DataFrame]:
    """Per (cross-validated dataset, strategy): the confusion matrix of the pooled test
    predictions, summed over folds and seeds (rows: true class, columns: predicted)."""
    if predictions.empty or "label" not in predictions:
        return {}
    probs = [c for c in predictions if c.startswith("prob.")]
    classes = [c.removeprefix("prob.") for c in probs]
    merged = predictions.merge(results[["run_id", "cv_key", "strategy_label"]], on="run_id")
    merged["pred"] = merged[probs].to_numpy().argmax(axis=1)
    out = {}
    for (ds, s), g in merged.groupby(["cv_key", "strategy_label"], sort=True):
        m = pd.crosstab(g["label"].astype(int), g["pred"]).reindex(
            index=range(len(classes)), columns=range(len(classes)), fill_value=0)
        m.index, m.columns = classes, classes
        m.index.name, m.columns.name = "true", "predicted"
        out[(ds, s)] = m
    return out
