"""The statistics of the report: confidence intervals, paired tests, Friedman + Nemenyi.

Why these: seeds are few (3-5), so a CI from the t-distribution rather than a normal one; two
strategies run with the same seed share the data split and initialisation, so they are compared
*paired* on seeds. Wilcoxon's signed-rank test makes no normality assumption but cannot reach
p < 0.05 with fewer than 6 pairs (its smallest two-sided p is 2/2^n), so with fewer seeds the
paired t-test is used and the report names the test it ran. Across datasets, Demšar (2006):
Friedman's test on per-dataset ranks, then the Nemenyi critical difference
``CD = q_alpha / sqrt(2) * sqrt(k (k + 1) / (6 N))`` with ``q_alpha`` the studentized range
quantile for ``k`` groups and infinite degrees of freedom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

#: fewest pairs for which Wilcoxon's exact two-sided p can fall below 0.05
MIN_WILCOXON_PAIRS = 6
#: :attr:`PairedTest.test` when every pair differs by the same non-zero amount (below
#: ``MIN_WILCOXON_PAIRS`` pairs): the t statistic is undefined, so no p is given
CONSTANT_DIFFERENCE = "no test (the same difference on every pair)"
#: the power a seed count is sized for (:func:`seeds_needed`)
POWER = 0.8


def mean_ci(values: np.ndarray | pd.Series | list[float], level: float = 0.95
            ) -> tuple[float, float, float, float, int]:
    """``(mean, std, ci_low, ci_high, n)``: sample std (ddof=1) and a t-distribution CI."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    m = float(x.mean())
    if n == 1:
        return m, math.nan, math.nan, math.nan, 1
    s = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * s / math.sqrt(n)
    return m, s, m - half, m + half, n


def mean_ci_table(results: pd.DataFrame, metric: str, by: tuple[str, ...] = ("dataset_key",
                  "strategy_label"), level: float = 0.95) -> pd.DataFrame:
    """Per group: ``mean, std, ci_low, ci_high, n`` of ``metric`` over seeds."""
    rows = []
    for key, g in results.groupby(list(by), sort=True):
        m, s, lo, hi, n = mean_ci(g[metric], level)
        rows.append((*key, m, s, lo, hi, n))
    return pd.DataFrame(rows, columns=[*by, "mean", "std", "ci_low", "ci_high", "n"])


@dataclass(frozen=True)
class PairedTest:
    test: str  # "Wilcoxon signed-rank", "paired t-test" or a reason no test ran
    statistic: float
    p_value: float
    n_pairs: int
    mean_diff: float


def paired_test(a: pd.Series, b: pd.Series) -> PairedTest:
    """Compare ``a`` and ``b`` (indexed by seed) on the seeds they share."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    n = len(both)
    diff = (both["a"] - both["b"]).to_numpy()
    mean_diff = float(diff.mean()) if n else math.nan
    if n < 2:
        return PairedTest("no test (fewer than 2 paired seeds)", math.nan, math.nan, n, mean_diff)
    if np.allclose(diff, 0):
        return PairedTest("no test (identical results)", math.nan, 1.0, n, mean_diff)
    if n < MIN_WILCOXON_PAIRS and np.allclose(diff, diff[0]):
        # t = mean / (0 / sqrt(n)) is infinite and scipy's p = 0 comes with a RuntimeWarning: a
        # spread of 0 over a few seeds is no evidence of a certain difference, so no p at all
        return PairedTest(CONSTANT_DIFFERENCE, math.nan, math.nan, n, mean_diff)
    if n >= MIN_WILCOXON_PAIRS:
        res = stats.wilcoxon(both["a"], both["b"])
        return PairedTest("Wilcoxon signed-rank", float(res.statistic), float(res.pvalue), n,
                          mean_diff)
    res = stats.ttest_rel(both["a"], both["b"])
    return PairedTest("paired t-test", float(res.statistic), float(res.pvalue), n, mean_diff)


def ranks(scores: pd.DataFrame, higher_is_better: bool = True) -> pd.DataFrame:
    """Rank strategies (columns) within each dataset (row); 1 = best, ties share the average."""
    values = -scores if higher_is_better else scores
    return values.rank(axis=1, method="average")


@dataclass(frozen=True)
class FriedmanNemenyi:
    avg_ranks: pd.Series  # per strategy, ascending (best first)
    statistic: float  # Friedman chi-square (tie-corrected)
    p_value: float
    cd: float  # Nemenyi critical difference at alpha
    alpha: float
    n_datasets: int
    n_strategies: int


def friedman_nemenyi(scores: pd.DataFrame, alpha: float = 0.05,
                     higher_is_better: bool = True) -> FriedmanNemenyi:
    """Friedman test + Nemenyi CD on a datasets x strategies table of per-dataset mean scores.

    Implemented from the rank sums (same statistic as :func:`scipy.stats.friedmanchisquare`,
    tie-corrected) so that it also works for two strategies.
    """
    scores = scores.dropna(axis=0, how="any")
    n, k = scores.shape
    if n < 2 or k < 2:
        raise ValueError(f"Friedman needs >= 2 datasets and >= 2 strategies, got {n} x {k}")
    r = ranks(scores, higher_is_better)
    rank_sums = r.sum(axis=0).to_numpy()
    chi2 = 12.0 / (n * k * (k + 1)) * float((rank_sums**2).sum()) - 3.0 * n * (k + 1)
    ties = 0.0
    for _, row in r.iterrows():
        _, counts = np.unique(row.to_numpy(), return_counts=True)
        ties += float((counts**3 - counts).sum())
    correction = 1.0 - ties / (n * k * (k * k - 1))
    chi2 = chi2 / correction if correction > 0 else math.nan
    p = float(stats.chi2.sf(chi2, k - 1)) if not math.isnan(chi2) else math.nan
    q = float(stats.studentized_range.ppf(1 - alpha, k, np.inf))
    cd = q / math.sqrt(2) * math.sqrt(k * (k + 1) / (6.0 * n))
    return FriedmanNemenyi(r.mean(axis=0).sort_values(), chi2, p, cd, alpha, n, k)


def cliques(avg_ranks: pd.Series, cd: float) -> list[list[str]]:
    """Maximal groups of strategies whose average ranks differ by less than ``cd``."""
    names = list(avg_ranks.index)
    vals = avg_ranks.to_numpy()
    out: list[list[str]] = []
    for i in range(len(names)):
        j = i
        while j + 1 < len(names) and vals[j + 1] - vals[i] < cd:
            j += 1
        if j > i and not any(set(names[i:j + 1]) <= set(c) for c in out):
            out.append(names[i:j + 1])
    return out


def paired_t_power(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs at standardised effect ``effect``
    (mean difference / sd of the differences): under the alternative T follows the noncentral
    t with n - 1 degrees of freedom and noncentrality ``effect·sqrt(n)``, and the test rejects
    when |T| exceeds the central t's 1 - α/2 quantile."""
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = abs(effect) * math.sqrt(n)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(mean_diff: float, sd: float, alpha: float = 0.05, power: float = POWER,
                 limit: int = 10_000) -> int | None:
    """The fewest paired seeds with which a two-sided paired t-test at ``alpha`` separates a
    true difference ``mean_diff`` with paired-difference spread ``sd`` with at least ``power``
    (taking the observed values as the truth: a planning figure, not a promise). None when the
    sd is 0 or not finite (no spread to plan with) or when more than ``limit`` seeds would
    be needed."""
    if not (math.isfinite(mean_diff) and math.isfinite(sd)) or sd <= 0 or mean_diff == 0:
        return None
    effect = abs(mean_diff) / sd
    for n in range(2, limit + 1):
        if paired_t_power(effect, n, alpha) >= power:
            return n
    return None
