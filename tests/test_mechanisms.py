"""The report's "Did each strategy act?" table, the LR-vs-transferability spread gate, what
learning the rates buys (metalr − discriminative) and the θ_r label (issue 23).

The pure functions are checked on hand-built DataFrames against hand computations and scipy;
the rendering on a real SQLite MLflow store written here run by run (no training: the numbers
are chosen, so the HTML can be checked against them) and executed through papermill.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from bs4 import BeautifulSoup
from metalr_bench.benchmark.tracking.client import Tracker
from metalr_bench.reports import learned_rates as lg
from metalr_bench.reports import mechanisms as mech
from metalr_bench.reports import transferability as rt
from metalr_bench.reports.build import build_report
from scipy import stats as sps

# -- "Did each strategy act?" -------------------------------------------------------------------


@pytest.mark.parametrize(("figure", "start", "end", "words"), [
    ("l2sp/penalty_share", 0.2, 0.03, "acts: 3 % of the loss at the end"),
    ("delta/penalty_share", 0.62, 0.031,
     "dominates the loss at the start (62 %); acts: 3 % of the loss at the end"),
    ("bss/penalty_share", 4e-5, 2e-5, "negligible: under 0.01 % of the loss"),
    ("bss/penalty_share", 0.5, 5e-5,
     "dominates the loss at the start (50 %); negligible at the end (0.005 % of the loss)"),
    ("l2sp/penalty_share", 0.01, 0.0025, "acts: 0.25 % of the loss at the end"),
    ("lr_spread", 1.0, 2.4, "rates moved: spread 1.0× → 2.4×"),
    ("lr_spread", 13.2, 13.2, "fixed spread 13× (by design)"),
    ("lr_spread", 1.0, 1.002, "rates did not move (spread 1.002×)"),
    ("lr_spread", 10.0, 4.0, "rates moved: spread 10× → 4.0×"),
    ("trainable_share", 0.12, 0.12, "trains 12 % of the parameters"),
    ("trainable_share", 0.1, 1.0,
     "trains 10 % of the parameters at the start, 100 % at the end"),
    ("lp_ft/probe_train_loss", 0.69, 0.05, "probe converged to 0.05"),
    ("linear_probe/probe_train_loss", 0.31, 0.31, "probe converged to 0.31"),
    ("wise_ft/alpha", 0.7, 0.7, "interpolated: α* = 0.7 between the starting and the fine-tuned model"),
    ("wise_ft/alpha", 0.0, 0.0, "α* = 0: kept the starting model (fine-tuning did not help on validation)"),
    ("sam/sharpness", 0.02, 0.005, "sharpness L(w+ε) − L(w) 0.02 → 0.005"),
    ("something/else", 1.0, 2.0, "1 → 2"),
    ("lr_spread", math.nan, math.nan, "`lr_spread` was not logged"),
])
def test_verdict_in_words(figure: str, start: float, end: float, words: str) -> None:
    assert mech.verdict(figure, start, end) == words


def _runs(rows: list[tuple[str, str, int, str | None]]) -> pd.DataFrame:
    return pd.DataFrame([{"run_id": f"{ds}-{s}-{seed}", "dataset_key": ds, "strategy_label": s,
                          "strategy": s, "seed": seed, "mechanism": tag}
                         for ds, s, seed, tag in rows])


def test_mechanism_table_first_and_last_value_mean_over_seeds() -> None:
    results = _runs([("d@16", "l2sp", 0, "l2sp/penalty_share"),
                     ("d@16", "l2sp", 1, "l2sp/penalty_share"),
                     ("d@16", "hd", 0, "lr_spread"), ("d@16", "hd", 1, "lr_spread"),
                     ("d@16", "full", 0, None), ("d@16", "full", 1, float("nan")),
                     ("d@16", "last_k", 0, "")])
    hist = pd.DataFrame(
        # steps deliberately out of order: first/last are by step, not by row
        [("d@16-l2sp-0", "l2sp/penalty_share", s, v) for s, v in ((2, 0.02), (0, 0.6), (1, 0.1))]
        + [("d@16-l2sp-1", "l2sp/penalty_share", s, v) for s, v in ((0, 0.8), (1, 0.2),
                                                                    (2, 0.04))]
        + [("d@16-hd-0", "lr_spread", s, v) for s, v in ((0, 1.0), (1, 1.001), (2, 1.002))]
        + [("d@16-hd-1", "lr_spread", s, v) for s, v in ((0, 1.0), (2, 1.004))]
        + [("d@16-hd-0", "val_auc", 0, 0.5)],  # other metrics are ignored
        columns=["run_id", "key", "step", "value"])
    table = mech.mechanism_table(results, hist).set_index("strategy_label")
    assert table.loc["l2sp", "start"] == pytest.approx(0.7)
    assert table.loc["l2sp", "end"] == pytest.approx(0.03)
    assert table.loc["l2sp", "verdict"] == ("dominates the loss at the start (70 %); acts: 3 % "
                                            "of the loss at the end")
    assert table.loc["hd", ["start", "end", "n_runs"]].tolist() == [1.0, pytest.approx(1.003), 2]
    assert table.loc["hd", "verdict"] == "rates did not move (spread 1.003×)"
    for no_tag in ("full", "last_k"):
        assert table.loc[no_tag, "verdict"] == "no mechanism to show"
        assert table.loc[no_tag, "figure"] == ""
    assert mech.mechanism_keys(results) == ["l2sp/penalty_share", "lr_spread"]
    html = BeautifulSoup(mech.mechanism_html(table.reset_index()), "html.parser")
    cells = [[td.get_text() for td in tr.select("td")] for tr in html.select("table#mechanisms tr")]
    assert ["d@16", "l2sp", "l2sp/penalty_share", "70 %", "3 %"] == cells[[
        c[1] if c else "" for c in cells].index("l2sp")][:5]


def test_a_tagged_strategy_that_logged_nothing_says_so() -> None:
    results = _runs([("d@16", "bss", 0, "bss/penalty_share")])
    empty = pd.DataFrame(columns=["run_id", "key", "step", "value"])
    row = mech.mechanism_table(results, empty).iloc[0]
    assert row["n_runs"] == 0 and row["verdict"] == "`bss/penalty_share` was not logged"
    no_column = results.drop(columns="mechanism")
    assert mech.mechanism_table(no_column, empty).iloc[0]["verdict"] == "no mechanism to show"


# -- LR against transferability only where the rates spread -----------------------------------


def _lr_tables(final_backbone: list[float], head: float = 1e-2) -> tuple[pd.DataFrame, ...]:
    """full's T on 5 groups; ``hd`` starts every group at 1e-3 and ends at ``final_backbone``."""
    groups = ["stem", "b1", "b2", "b3", "b4"]
    trans = pd.DataFrame([{"run_id": "f", "dataset_key": "d@16", "strategy_label": "full",
                           "strategy": "full", "seed": 0, "group": g, "transferability": t}
                          for g, t in zip(groups, [9, 7, 5, 3, 1], strict=True)])
    rows = [{"run_id": "h", "dataset_key": "d@16", "strategy_label": "hd", "strategy": "hd",
             "seed": 0, "key": f"lr/{g}", "step": step, "value": v}
            for g, end in zip([*groups, "head"], [*final_backbone, head], strict=True)
            for step, v in ((0, 1e-3), (1, (1e-3 + end) / 2), (2, end))]
    return trans, pd.DataFrame(rows)


def test_lr_transferability_correlation_only_where_the_rates_spread() -> None:
    # the backbone rates moved by 0.2 % (the head's 10× does not count: it has no T)
    trans, hist = _lr_tables([1e-3, 1.0005e-3, 1.001e-3, 1.0015e-3, 1.002e-3])
    lrs = rt.mean_lrs(hist)
    assert lrs.set_index("group").loc["b4", "final_lr"] == pytest.approx(1.002e-3)
    out = rt.lr_against_transferability(trans, lrs, ["stem", "b1", "b2", "b3", "b4", "head"])
    assert out.correlations.empty
    assert out.notes == ["On d@16, hd: the rates did not move apart (final spread 1.002× across "
                         "the layer groups that have a T, max/min, under 1.1×); no rank "
                         "correlation."]
    # spread 1.2× at the end: the correlation is computed (perfectly anti-correlated, exact p)
    trans, hist = _lr_tables([1.2e-3, 1.15e-3, 1.1e-3, 1.05e-3, 1.0e-3][::-1])
    out = rt.lr_against_transferability(trans, rt.mean_lrs(hist), [])
    assert out.notes == []
    row = out.correlations.iloc[0]
    assert (row["rho"], row["p"]) == (pytest.approx(-1.0), pytest.approx(2 / 120))
    assert rt.spread([1e-3, 2e-3, 0.0, float("nan")]) == pytest.approx(2.0)


# -- what learning the rates buys --------------------------------------------------------------


def _gain_results() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(4):
        base = 0.8 + 0.02 * seed
        for s, shift in (("metalr", 0.01), ("discriminative", 0.0), ("full", -0.02)):
            rows.append({"run_id": f"{s}{seed}", "dataset_key": "d@16", "cv_key": None,
                         "fold": None, "strategy": s, "strategy_label": s, "seed": seed,
                         "test_auc": base + shift + rng.normal(0, 0.005)})
        for fold in range(3):  # a cross-validated dataset: one dataset_key per fold
            for s, shift in (("metalr", -0.03), ("discriminative", 0.0)):
                rows.append({"run_id": f"cv{s}{seed}{fold}", "dataset_key": f"cv-f{fold}@16",
                             "cv_key": "cv@16", "fold": fold, "strategy": s,
                             "strategy_label": s, "seed": seed,
                             "test_auc": base + 0.01 * fold + shift + rng.normal(0, 0.004)})
    return pd.DataFrame(rows)


def test_learned_rates_gain_is_the_paired_difference() -> None:
    results = _gain_results()
    gain = lg.learned_rates_gain(results, "test_auc").set_index("dataset")
    assert set(gain.index) == {"d@16", "cv-f0@16", "cv-f1@16", "cv-f2@16", "cv@16"}
    a = results[(results["dataset_key"] == "d@16") & (results["strategy"] == "metalr")]
    b = results[(results["dataset_key"] == "d@16") & (results["strategy"] == "discriminative")]
    diff = a["test_auc"].to_numpy() - b["test_auc"].to_numpy()  # same seed order
    half = sps.t.ppf(0.975, 3) * diff.std(ddof=1) / 2
    row = gain.loc["d@16"]
    assert row["mean_diff"] == pytest.approx(diff.mean())
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(diff.mean() - half),
                                               pytest.approx(diff.mean() + half))
    assert row["test"] == "paired t-test" and row["n_pairs"] == 4
    assert row["p"] == pytest.approx(sps.ttest_rel(a["test_auc"], b["test_auc"]).pvalue)
    # the folds pooled: 12 (fold, seed) pairs, Wilcoxon from 6 pairs
    cv = results[results["cv_key"] == "cv@16"].sort_values(["fold", "seed"])
    x = cv[cv["strategy"] == "metalr"]["test_auc"].to_numpy()
    y = cv[cv["strategy"] == "discriminative"]["test_auc"].to_numpy()
    row = gain.loc["cv@16"]
    assert (row["n_pairs"], row["test"]) == (12, "Wilcoxon signed-rank")
    assert row["mean_diff"] == pytest.approx((x - y).mean())
    assert row["p"] == pytest.approx(sps.wilcoxon(x, y).pvalue)
    assert row["p"] < 0.05 and "significantly worse than the fixed starting rates" in row[
        "sentence"]
    p = gain.loc["d@16", "p"]
    assert gain.loc["d@16", "sentence"] == (
        f"On d@16, learning the rates (metalr − discriminative) changes test_auc by "
        f"{diff.mean():+.3f} (95% CI {diff.mean() - half:+.3f} to {diff.mean() + half:+.3f}; "
        f"paired t-test over 4 seeds, paired on seed, p = {p:.3f}): "
        + ("not significantly different from" if p >= 0.05 else "significantly better than")
        + " the fixed starting rates.")
    assert lg.missing_control(results) == []
    no_control = results[results["strategy"] != "discriminative"]
    assert lg.learned_rates_gain(no_control, "test_auc").empty
    assert lg.missing_control(no_control) == ["cv-f0@16", "cv-f1@16", "cv-f2@16", "d@16"]


# -- θ_r label -----------------------------------------------------------------------------------


def test_reference_labels_per_dataset() -> None:
    results = pd.DataFrame([
        {"dataset_key": "a@16", "transferability/stem": 2.0,
         "param.transferability_reference": "pretrain_start"},
        {"dataset_key": "b@16", "transferability/stem": 2.0,
         "param.transferability_reference": "random_draw"},
        {"dataset_key": "c@16", "transferability/stem": 2.0,
         "param.transferability_reference": None},  # an earlier version: a random draw
        {"dataset_key": "d@16", "transferability/stem": math.nan,
         "param.transferability_reference": None},  # no T: no label
    ])
    assert rt.reference_labels(results) == {
        "a@16": "θ_r = the pre-training's own random start",
        "b@16": "θ_r = an independent random draw (the source's start is unknown)",
        "c@16": "θ_r = an independent random draw (the source's start is unknown)",
    }


# -- rendered: a store written run by run -----------------------------------------------------


def _log_cell(tracker: Tracker, parent: str, strategy: str, seed: int, auc: float,
              tag: str | None, series: dict[str, list[float]]) -> None:
    tags: dict[str, Any] = {"kind": "cell", "dataset": "synthetic", "image_size": 16,
                            "strategy": strategy, "strategy_label": strategy, "seed": seed,
                            "model": "smallcnn"}
    if tag:
        tags["mechanism"] = tag
    with tracker.run(f"{strategy}-{seed}", tags=tags, parent_id=parent) as run_id:
        for key, values in series.items():
            for step, v in enumerate(values):
                tracker.log_metrics(run_id, {key: v}, step=step)
        tracker.log_metrics(run_id, {"test_auc": auc, "test_acc": auc - 0.1}, step=len(
            next(iter(series.values()), [0])))


@pytest.mark.slow
def test_report_renders_the_mechanisms_and_the_learned_rates(mlflow_uri: str,
                                                             tmp_path: Path) -> None:
    tracker = Tracker(mlflow_uri, "mech")
    aucs = {"metalr": [0.81, 0.84, 0.80], "discriminative": [0.80, 0.82, 0.80],
            "l2sp": [0.7, 0.71, 0.72], "full": [0.75, 0.76, 0.77]}
    with tracker.run("mech-benchmark", tags={"kind": "benchmark"}) as parent:
        for seed in range(3):
            lr = {f"lr/{g}": [1e-3, 1e-3 * (1 + 0.5 * i)] for i, g in enumerate(
                ("stem", "block1", "block2", "head"))}
            _log_cell(tracker, parent, "metalr", seed, aucs["metalr"][seed], "lr_spread",
                      {"lr_spread": [1.0, 2.4], "train_loss": [1.0, 0.5], **lr})
            _log_cell(tracker, parent, "discriminative", seed, aucs["discriminative"][seed],
                      "lr_spread", {"lr_spread": [13.0, 13.0], "train_loss": [1.0, 0.6]})
            _log_cell(tracker, parent, "l2sp", seed, aucs["l2sp"][seed], "l2sp/penalty_share",
                      {"l2sp/penalty_share": [0.6, 0.03], "train_loss": [1.0, 0.7]})
            _log_cell(tracker, parent, "full", seed, aucs["full"][seed], None,
                      {"train_loss": [1.0, 0.4]})
    paths = build_report(mlflow_uri, "mech", parent_run_id=parent,
                         output_dir=tmp_path / "reports", log_artifacts=False)
    soup = BeautifulSoup(paths.html.read_text(encoding="utf-8"), "html.parser")
    text = " ".join(soup.get_text(" ").split())
    assert "Traceback" not in text
    rows = {tds[1]: tds for tds in ([td.get_text() for td in tr.select("td")]
                                    for tr in soup.select("table#mechanisms tr")) if tds}
    assert rows["metalr"][2:] == ["lr_spread", "1.0×", "2.4×", "rates moved: spread 1.0× → 2.4×"]
    assert rows["discriminative"][5] == "fixed spread 13× (by design)"
    assert rows["l2sp"][5] == ("dominates the loss at the start (60 %); acts: 3 % of the loss "
                               "at the end")
    assert rows["full"][5] == "no mechanism to show"
    diff = np.subtract(aucs["metalr"], aucs["discriminative"])
    p = sps.ttest_rel(aucs["metalr"], aucs["discriminative"]).pvalue
    found = re.search(r"On synthetic@16, learning the rates \(metalr − discriminative\) changes "
                      r"test_auc by ([+-][\d.]+) \(95% CI ([+-][\d.]+) to ([+-][\d.]+); paired "
                      r"t-test over 3 seeds, paired on seed, p = ([\d.]+)\)", text)
    assert found, text[text.find("What learning the rates buys"):][:600]
    half = sps.t.ppf(0.975, 2) * diff.std(ddof=1) / math.sqrt(3)
    assert float(found.group(1)) == pytest.approx(diff.mean(), abs=5e-4)
    assert float(found.group(2)) == pytest.approx(diff.mean() - half, abs=5e-4)
    assert float(found.group(3)) == pytest.approx(diff.mean() + half, abs=5e-4)
    assert float(found.group(4)) == pytest.approx(p, abs=5e-4)
