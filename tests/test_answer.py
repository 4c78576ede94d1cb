"""The report's answer paragraph (reports/answer.py) on tables shaped like results_table().

Every expectation is computed by hand or with scipy beside the code: the Holm adjustment, the
paired tests, the ranks and Friedman's statistic.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from metalr_bench.reports import answer as A
from scipy import stats


def _runs(means: dict[str, dict[str, float]], seeds: int = 5, *, noise: dict[str, float] | None
          = None, folds: int | None = None, time: dict[str, float] | None = None,
          seed: int = 0, offsets: dict[str, list[float]] | None = None) -> pd.DataFrame:
    """One row per run: ``means[dataset][strategy]`` plus seeded noise per (fold, seed), or
    the given ``offsets`` per seed."""
    rng = np.random.default_rng(seed)
    rows = []
    for ds, per in means.items():
        for fold in range(folds) if folds else [None]:
            for s in range(seeds):
                for strat, m in per.items():
                    sd = (noise or {}).get(strat, 0.002)
                    rows.append({
                        "run_id": f"{ds}-{fold}-{s}-{strat}", "status": "FINISHED",
                        "dataset_key": f"{ds}-fold{fold}@28" if folds else f"{ds}@28",
                        "cv_key": f"{ds}@28" if folds else None, "fold": fold,
                        "strategy": strat, "strategy_label": strat, "seed": s,
                        "test_auc": m + ((offsets or {}).get(strat) or [rng.normal(0, sd)]
                                         * seeds)[s],
                        "mean_epoch_time_s": (time or {}).get(strat, 1.0)})
    return pd.DataFrame(rows)


def test_holm_matches_a_hand_computation() -> None:
    # sorted 0.01, 0.03, 0.04: 3 * 0.01 = 0.03; 2 * 0.03 = 0.06; max(0.06, 1 * 0.04) = 0.06
    assert A.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = A.holm([0.5, math.nan, 0.001])  # NaN: no test, not counted in m
    assert out[0] == pytest.approx(0.5) and math.isnan(out[1]) and out[2] == pytest.approx(0.002)
    assert A.holm([0.6, 0.7]) == [1.0, 1.0]


def test_min_blocks_for_friedman() -> None:
    # k = 3: the largest statistic is 2N and chi2.sf(2N, 2) = exp(-N) < 0.05 from N = 3
    assert A.min_blocks_for_friedman(3) == 3
    # k = 2: chi2.sf(N, 1) < 0.05 from N = 4 (3.84 is the critical value)
    assert A.min_blocks_for_friedman(2) == 4


def test_the_sentence_names_the_best_and_the_two_it_cannot_be_told_from() -> None:
    """A clearly best over D; B and C tie with A (their paired differences are noise)."""
    res = _runs({"breastmnist": {"A": 0.90, "B": 0.895, "C": 0.893, "D": 0.70}},
                offsets={"B": [0.03, -0.03, 0.02, -0.02, 0.0], "C": [-0.02, 0.03, 0.0, -0.03,
                                                                    0.02]})
    ans = A.the_answer(res, "test_auc")
    a = ans.per_dataset["breastmnist@28"]
    means = res.groupby("strategy_label")["test_auc"].mean()
    assert a.best == means.idxmax() == "A"
    # the paired tests by hand: scipy's ttest_rel on the seeds, Holm over the three comparisons
    piv = res.pivot(index="seed", columns="strategy_label", values="test_auc")
    raw = {s: stats.ttest_rel(piv[s], piv["A"]).pvalue for s in ("B", "C", "D")}
    holm = dict(zip(raw, A.holm(list(raw.values())), strict=True))
    assert dict(zip(a.comparisons["strategy"], a.comparisons["p_holm"], strict=True)) == \
        pytest.approx(holm)
    assert holm["D"] < 0.05 and holm["B"] >= 0.05 and holm["C"] >= 0.05
    assert sorted(a.tied) == ["B", "C"]
    text = " ".join(a.sentences)
    assert "`A` is best on AUC" in text
    assert "`B` and `C` cannot be told apart from it" in text
    assert "paired t-tests over 5 seeds, Holm-corrected at α = 0.05" in text
    assert "Time per epoch" not in text  # no `full` in this grid


def test_every_other_strategy_behind_and_cost_relative_to_full() -> None:
    res = _runs({"pneumoniamnist": {"A": 0.95, "full": 0.90, "C": 0.80}},
                time={"A": 3.0, "full": 1.5, "C": 0.75})
    a = A.the_answer(res, "test_auc").per_dataset["pneumoniamnist@28"]
    text = " ".join(a.sentences)
    assert a.tied == [] and "Every other strategy is significantly behind it" in text
    assert "Time per epoch relative to `full` (1.50 s): `A` 2.00×." in text


def test_metalr_over_discriminative_and_transfer_over_scratch() -> None:
    res = _runs({"retinamnist": {"metalr": 0.72, "discriminative": 0.71, "full": 0.70,
                                 "scratch": 0.60}})
    text = " ".join(A.the_answer(res, "test_auc").per_dataset["retinamnist@28"].sentences)
    piv = res.pivot(index="seed", columns="strategy_label", values="test_auc")
    d = (piv["metalr"] - piv["discriminative"]).mean()
    assert f"MetaLR's learned rates over its starting rates (`discriminative`): {d:+.3f} AUC " \
           "(paired t-test" in text
    t = (piv["full"] - piv["scratch"]).mean()
    assert f"Transfer over training from scratch (`full` − `scratch`): {t:+.3f} AUC" in text


def test_three_datasets_one_strategy_wins_two_and_ties_one() -> None:
    """A wins d1 and d2 clearly; on d3 B is ahead by noise and A cannot be told from it."""
    res = _runs({"d1": {"A": 0.90, "B": 0.85, "C": 0.80},
                 "d2": {"A": 0.80, "B": 0.75, "C": 0.70},
                 "d3": {"A": 0.700, "B": 0.702, "C": 0.60}}, noise={"A": 0.004, "B": 0.004})
    ans = A.the_answer(res, "test_auc")
    assert ans.per_dataset["d3@28"].best == "B" and ans.per_dataset["d3@28"].tied == ["A"]
    cross = ans.across
    assert cross.n_blocks == 3
    assert cross.ranks.loc["d1@28"].to_dict() == {"A": 1.0, "B": 2.0, "C": 3.0}
    assert cross.avg_ranks.to_dict() == pytest.approx({"A": 4 / 3, "B": 5 / 3, "C": 3.0})
    # Friedman by hand: rank sums 4, 5, 9; 12 / (N k (k+1)) * sum R^2 - 3 N (k+1)
    chi2 = 12 / (3 * 3 * 4) * (16 + 25 + 81) - 3 * 3 * 4
    assert cross.friedman.statistic == pytest.approx(chi2)
    assert cross.friedman.p_value == pytest.approx(stats.chi2.sf(chi2, 2))
    text = " ".join(cross.sentences)
    assert "`A` has the best mean rank (1.33 of 3 strategies), then `B` (1.67)" in text
    assert f"χ² = {chi2:.2f}" in text and "not significant" in text
    assert "`A` is best or tied-best on every dataset." in text
    assert "Where the datasets disagree: on d3@28 `B` is best and `A` cannot be told apart " \
           "from it." in text


def test_one_seed_says_no_test_is_possible() -> None:
    res = _runs({"breastmnist": {"A": 0.9, "B": 0.8}}, seeds=1)
    ans = A.the_answer(res, "test_auc")
    a = ans.per_dataset["breastmnist@28"]
    assert not a.testable
    text = " ".join(a.sentences)
    assert "No paired test is possible: 1 paired run per strategy (1 seed)" in text
    assert "at least 2 (1 more seed)" in text
    assert "no ranking or test, there is 1 dataset" in " ".join(ans.across.sentences)


def test_folds_of_one_dataset_are_one_block() -> None:
    """A 5-fold run of one dataset has no across-datasets test (its folds used to be ranked as 5
    datasets); 2 datasets × 5 folds rank over 2 blocks, each pooling its folds and seeds."""
    one = _runs({"pocus": {"A": 0.9, "B": 0.8, "C": 0.7}}, seeds=2, folds=5)
    assert one["dataset_key"].nunique() == 5
    ans = A.the_answer(one, "test_auc")
    assert list(ans.per_dataset) == ["pocus@28"] and ans.across.friedman is None
    # 10 pairs on (fold, seed): Wilcoxon (>= 6 pairs)
    assert "Wilcoxon signed-rank tests over 5 folds × 2 seeds" in " ".join(
        ans.per_dataset["pocus@28"].sentences)
    two = _runs({"pocus": {"A": 0.9, "B": 0.8, "C": 0.7}, "busi": {"A": 0.6, "B": 0.7, "C": 0.5}},
                seeds=2, folds=5)
    scores = A.block_scores(two, "test_auc")
    assert list(scores.index) == ["busi@28", "pocus@28"]
    assert scores.loc["busi@28", "B"] == pytest.approx(
        two[(two["cv_key"] == "busi@28") & (two["strategy"] == "B")]["test_auc"].mean())
    cross = A.the_answer(two, "test_auc").across
    assert cross.n_blocks == 2 and cross.friedman.n_datasets == 2
    assert cross.avg_ranks.to_dict() == {"A": 1.5, "B": 1.5, "C": 3.0}


def test_gains_over_full_are_paired_and_holm_marked() -> None:
    res = _runs({"d1": {"full": 0.80, "A": 0.85, "B": 0.801}, "d2": {"full": 0.7, "A": 0.71}},
                noise={"B": 0.02})
    g = A.gains_over_full(res, "test_auc")
    row = g[(g["dataset"] == "d1@28") & (g["strategy"] == "A")].iloc[0]
    d1 = res[res["dataset_key"] == "d1@28"].pivot(index="seed", columns="strategy",
                                                  values="test_auc")
    assert row["mean_diff"] == pytest.approx((d1["A"] - d1["full"]).mean())
    assert bool(row["significant"])
    assert not bool(g[(g["dataset"] == "d1@28") & (g["strategy"] == "B")]["significant"].iloc[0])
    fig = A.gain_heatmap(g, "test_auc")
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert f"{row['mean_diff']:+.3f}*" in texts
