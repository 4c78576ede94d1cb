"""The answer: the report's opening paragraph, written from the statistics.

A researcher who runs the full budget once reads the first paragraph: which strategy for my data,
and how sure are we. This module writes it from the finished runs (a DataFrame shaped like
:func:`results.results_table`), nothing else:

* **per dataset**: the best strategy on the primary metric; the strategies that cannot be told
  apart from it (each paired with the best on (fold, seed), the test :func:`stats.paired_test`
  picks, Holm's step-down correction over the comparisons of that dataset at α = 0.05; a strategy
  with fewer than 2 paired runs is "not tested", never a tie); for each tie the seeds a paired
  t-test would need to separate it (:func:`more_seeds`); the time per run (epochs × time per
  epoch + one-off seconds) relative to ``full``; and, where the grid has them, what MetaLR's
  learned rates buy over ``discriminative`` (its starting rates without the hyper-gradient; the
  sentence says whether the control ran at MetaLR's tuned parameters or was tuned apart, and
  across datasets :func:`control_across` pools the like-for-like ones) and what transfer buys
  over ``scratch`` (``full`` against the same network from random weights);
* **across datasets**: mean ranks and Friedman's test with the Nemenyi critical difference
  (:func:`stats.friedman_nemenyi`, the report's machinery), whether one strategy is best or
  tied-best everywhere, and where the datasets disagree;
* a dataset × strategy table of each strategy's paired gain over ``full``, Holm-marked.

**Folds of one dataset are not datasets.** A cross-validated dataset is one *block*: its folds
and seeds are pooled (paired on (fold, seed)), as in the report's cross-validation section.
Across-dataset ranks and tests see one row per block; treating the k folds as k datasets would
count dependent splits as independent evidence.

Why Holm and not Bonferroni: it controls the same family-wise error rate and is uniformly more
powerful. Why uncorrected p for ``metalr`` vs ``discriminative`` and ``full`` vs ``scratch``:
each is a single comparison planned before the run, not a search over strategies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from metalr_bench.reports.learned_rates import CONTROL, LEARNED
from metalr_bench.reports.stats import (
    CONSTANT_DIFFERENCE,
    MIN_WILCOXON_PAIRS,
    POWER,
    FriedmanNemenyi,
    friedman_nemenyi,
    paired_test,
    ranks,
    seeds_needed,
)
from metalr_bench.reports.tables import METRIC_NAMES
from metalr_bench.reports.transferability import REFERENCE as BASELINE
from scipy import stats as sps

#: the strategies the answer measures against, each named once in the reports: ``full`` (the
#: baseline every gain is over, ``BASELINE``: also the transferability figure's reference) and
#: ``scratch`` (the lower bound: what transfer buys); MetaLR and its control come from
#: ``learned_rates``
LOWER_BOUND = "scratch"

ALPHA = 0.05
#: a t-test needs two pairs (one degree of freedom)
MIN_PAIRS = 2
#: the smallest paired difference in the primary metric worth buying seeds to separate (config
#: key ``min_effect``, logged on the parent run): a tie closer than this is "too small to matter"
MIN_EFFECT = 0.005


# -- blocks: one per dataset, folds pooled ------------------------------------------------------------
def with_blocks(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with ``block``: the cross-validated dataset (``cv_key``) for a fold's run, else
    ``dataset_key``. Across datasets, a block is one dataset."""
    out = results.copy()
    cv = out["cv_key"] if "cv_key" in out else pd.Series(None, index=out.index, dtype=object)
    out["block"] = [c if isinstance(c, str) and c else d for c, d in zip(cv, out["dataset_key"],
                                                                          strict=True)]
    return out


def _pair_on(block: pd.DataFrame) -> list[str]:
    """Pair two strategies' runs on (fold, seed) in a cross-validated block, else on seed."""
    return ["fold", "seed"] if "fold" in block and block["fold"].notna().any() else ["seed"]


def block_scores(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Blocks × strategies: mean of ``metric`` over each block's runs (folds × seeds pooled)."""
    b = with_blocks(results)
    return b.groupby(["block", "strategy_label"])[metric].mean().unstack("strategy_label")


# -- multiple comparisons ----------------------------------------------------------------------------
def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count in m).

    Sorted ascending, ``p_(i)`` becomes ``max_{j<=i} min(1, (m - j + 1) p_(j))``; a hypothesis is
    rejected at α when its adjusted p is below α.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(len(p), math.nan)
    idx = [i for i in np.argsort(p, kind="stable") if not math.isnan(p[i])]
    m, running = len(idx), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def min_blocks_for_friedman(k: int, alpha: float = ALPHA, limit: int = 1000) -> int:
    """The fewest datasets with which Friedman's test on ``k`` strategies *can* reach p < α: its
    largest statistic (every dataset ranks the strategies alike) is N (k - 1)."""
    if k < 2:
        raise ValueError(f"Friedman's test needs >= 2 strategies, got {k}")
    for n in range(2, limit + 1):
        if sps.chi2.sf(n * (k - 1), k - 1) < alpha:
            return n
    return limit


# -- comparisons within a block -----------------------------------------------------------------------
def _label_of(block: pd.DataFrame, strategy: str, metric: str) -> str | None:
    """The label of ``strategy`` (by name) in a block; of several (a parameter grid), the best."""
    sub = block[block["strategy"] == strategy] if "strategy" in block else block.iloc[0:0]
    if sub.empty:
        return None
    return str(sub.groupby("strategy_label")[metric].mean().idxmax())


def compare(block: pd.DataFrame, reference: str, metric: str,
            others: Sequence[str] | None = None) -> pd.DataFrame:
    """Each of ``others`` (default: every other label) against ``reference`` in one block, paired
    on (fold, seed): ``strategy, reference, mean_diff (other - reference), test, p, p_holm,
    n_pairs``, Holm over the rows."""
    keys = _pair_on(block)
    ref = block[block["strategy_label"] == reference].set_index(keys)[metric]
    labels = [s for s in (others if others is not None
                          else sorted(block["strategy_label"].unique())) if s != reference]
    rows = []
    for s in labels:
        other = block[block["strategy_label"] == s].set_index(keys)[metric]
        t = paired_test(other, ref)
        rows.append({"strategy": s, "reference": reference, "mean_diff": t.mean_diff,
                     "test": t.test, "p": t.p_value, "n_pairs": t.n_pairs})
    table = pd.DataFrame(rows, columns=["strategy", "reference", "mean_diff", "test", "p",
                                        "n_pairs"])
    table["p_holm"] = holm(table["p"].tolist()) if len(table) else []
    return table


@dataclass
class DatasetAnswer:
    """What one block says; ``sentences`` is the text, the rest is for tests and tables."""

    dataset: str
    best: str
    means: pd.Series  # per strategy label, over the block's runs
    comparisons: pd.DataFrame  # every other strategy vs the best (see :func:`compare`)
    testable: bool  # >= 2 pairs for the comparisons with the best
    tied: list[str] = field(default_factory=list)  # tested, cannot be told apart from the best
    #: fewer than MIN_PAIRS paired runs with the best: no test, so never a tie (label -> pairs)
    untested: dict[str, int] = field(default_factory=dict)
    #: the same non-zero difference on every pair (no spread, no p): label -> difference
    constant: dict[str, float] = field(default_factory=dict)
    #: per tie: mean paired difference (tie − best), its sd, pairs, seeds a paired t-test needs
    #: (None: too small to matter, or no spread), see :func:`more_seeds`
    seeds: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: MetaLR − its control here: mean_diff, p, test, how the control was tuned, like_for_like
    control: dict | None = None
    sentences: list[str] = field(default_factory=list)

    @property
    def tied_best(self) -> list[str]:
        return [self.best, *self.tied]


def _fmt_p(p: float) -> str:
    """``p = 0.17``, ``p < 0.001``, or ``p –`` when no test ran."""
    return "p –" if math.isnan(p) else f"p = {p:.2g}" if p >= 0.001 else "p < 0.001"


def _tests_named(comparisons: pd.DataFrame) -> str:
    names = sorted({t for t in comparisons["test"] if not t.startswith("no test")})
    plural = {"paired t-test": "paired t-tests", "Wilcoxon signed-rank": "Wilcoxon signed-rank tests"}
    return " and ".join(plural.get(n, n) for n in names) or "paired tests"


def _units(block: pd.DataFrame) -> str:
    seeds = block["seed"].nunique()
    s = f"{seeds} seed{'s' if seeds != 1 else ''}"
    if _pair_on(block) == ["fold", "seed"]:
        return f"{block['fold'].nunique()} folds × {s}"
    return s


def _code(s: str) -> str:
    return f"`{s}`"


def _list(items: Sequence[str]) -> str:
    items = [_code(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def dataset_answer(block: pd.DataFrame, dataset: str, metric: str,
                   alpha: float = ALPHA, race: str | None = None,
                   min_effect: float = MIN_EFFECT) -> DatasetAnswer:
    """The sentences for one block (one dataset; a cross-validated one with its folds pooled).

    ``race``: the block is a race's confirmation (``run-benchmark race``: only the top strategies
    of one study across strategies, re-run on seeds); the answer says so and ends with ``race``,
    the sentence on what the race spent next to the full grid's price."""
    name = METRIC_NAMES.get(metric, metric)
    means = block.groupby("strategy_label")[metric].mean().sort_values(ascending=False)
    best = str(means.index[0])
    comp = compare(block, best, metric)
    testable = bool(len(comp)) and int(comp["n_pairs"].max()) >= MIN_PAIRS
    n_runs = int((block["strategy_label"] == best).sum())
    out = DatasetAnswer(dataset, best, means, comp, testable)
    text = [f"**{dataset}**{' (a race)' if race else ''}: {_code(best)} is best on {name} "
            f"({means.iloc[0]:.3f}, mean of {n_runs} run{'s' if n_runs != 1 else ''})."]
    if comp.empty:
        text.append("It is the only strategy.")
    elif not testable:
        have = int(comp["n_pairs"].max())
        text.append(
            f"No paired test is possible: {have} paired run{'s' if have != 1 else ''} per "
            f"strategy ({_units(block)}); a paired t-test needs at least {MIN_PAIRS} "
            f"({MIN_PAIRS - have} more seed{'s' if MIN_PAIRS - have != 1 else ''}), Wilcoxon's "
            f"signed-rank test at least {MIN_WILCOXON_PAIRS}.")
    else:
        few = comp["n_pairs"] < MIN_PAIRS
        flat = comp["test"] == CONSTANT_DIFFERENCE
        tested = comp[~few & ~flat]
        out.untested = dict(zip(comp.loc[few, "strategy"], comp.loc[few, "n_pairs"].astype(int),
                                strict=True))
        out.constant = dict(zip(comp.loc[flat, "strategy"], comp.loc[flat, "mean_diff"],
                                strict=True))
        tied = tested[~(tested["p_holm"] < alpha)]
        out.tied = tied["strategy"].tolist()
        tests = f"{_tests_named(comp)} over {_units(block)}, Holm-corrected at α = {alpha:g}"
        other = "other tested strategy" if (out.untested or out.constant) else "other strategy"
        if tested.empty:
            pass
        elif out.tied and len(out.tied) == len(tested):
            text.append(f"No {other} can be told apart from it ({tests}).")
        elif out.tied:
            text.append(f"{_list(out.tied)} cannot be told apart from it; every {other} "
                        f"is significantly behind ({tests}).")
        else:
            text.append(f"Every {other} is significantly behind it ({tests}).")
        if out.constant:
            text.append("The same difference on every paired run (no spread, so no p; neither "
                        "tied nor tested): " + ", ".join(
                            f"{_code(s)} {d:+.3f}" for s, d in out.constant.items()) + ".")
        if out.untested:
            text.append(", ".join(
                f"{_code(s)}: not tested ({n} paired run{'s' if n != 1 else ''})"
                for s, n in out.untested.items())
                + f"; a paired test needs at least {MIN_PAIRS}, so these are not ties.")
        out.seeds = more_seeds(block, best, out.tied, metric, alpha, min_effect)
        seeds_text = _seeds_sentence(out.seeds, best, block, alpha, min_effect)
        if seeds_text:
            text.append(seeds_text)
    cost = _cost_sentence(block, out.tied_best, metric)
    if cost:
        text.append(cost)
    planned, out.control = _planned(block, metric)
    text += planned
    if race:
        text.append(race)
    out.sentences = text
    return out


def run_seconds(block: pd.DataFrame) -> pd.Series | None:
    """Per strategy label, the mean cost of one run in seconds: time per epoch × epochs (param
    ``epochs``) + the one-off seconds (``oneoff_time_s``: probe fit, α sweep, attention pass);
    None without the epoch count (tables of older runs), where only the time per epoch is
    comparable."""
    if "param.epochs" not in block or "mean_epoch_time_s" not in block:
        return None
    epochs = pd.to_numeric(block["param.epochs"], errors="coerce")
    oneoff = (pd.to_numeric(block["oneoff_time_s"], errors="coerce").fillna(0.0)
              if "oneoff_time_s" in block else 0.0)
    per_run = block["mean_epoch_time_s"] * epochs + oneoff
    if per_run.isna().all():
        return None
    return per_run.groupby(block["strategy_label"]).mean()


def _cost_sentence(block: pd.DataFrame, labels: Sequence[str], metric: str) -> str | None:
    """Cost of a run of the best and the tied strategies relative to ``full``: epochs × time
    per epoch + the one-off seconds (what a user pays per run); time per epoch alone for runs
    that do not log their epoch count."""
    full = _label_of(block, BASELINE, metric)
    if full is None or "mean_epoch_time_s" not in block:
        return None
    per_run = run_seconds(block)
    t = per_run if per_run is not None else \
        block.groupby("strategy_label")["mean_epoch_time_s"].mean()
    if full not in t or not t[full] > 0:
        return None
    parts = [f"{_code(s)} {t[s] / t[full]:.2f}×" for s in labels if s in t and not math.isnan(t[s])]
    if not parts:
        return None
    what = ("Time per run (epochs × time per epoch + one-off seconds) relative to "
            if per_run is not None else "Time per epoch relative to ")
    return f"{what}{_code(full)} ({t[full]:.2f} s): " + ", ".join(parts) + "."


def _tuning_of(block: pd.DataFrame, label: str) -> tuple[str, str | None]:
    """How the runs of ``label`` got their parameters: ``("tuned", None)``, ``("tuned",
    "metalr")`` (another strategy's study, tag ``tuned_from``), ``("race", None)`` (its own arm
    of a race's one study) or ``("untuned", None)``."""
    rows = block[block["strategy_label"] == label]
    source = rows["tuned_from"].dropna() if "tuned_from" in rows else pd.Series(dtype=object)
    if len(source):
        return "tuned", str(source.iloc[0])
    tuned = rows["tuned"].dropna() if "tuned" in rows else pd.Series(dtype=object)
    if (tuned.astype(str) == "race").any():
        return "race", None
    if len(tuned) or rows["strategy_label"].str.endswith("(tuned)").any():
        return "tuned", None
    return "untuned", None


def control_provenance(block: pd.DataFrame, learned: str, control: str) -> tuple[str, bool]:
    """What the control's runs were, as the answer says it, and whether the comparison is like
    for like: the control at MetaLR's tuned parameters, or both untuned (the same starting
    rates). Two separate studies end at two different learning rates: then the difference
    measures the tuning as much as the hyper-gradient."""
    (lk, _), (ck, source) = _tuning_of(block, learned), _tuning_of(block, control)
    if ck == "tuned" and source == LEARNED:
        return f"`{CONTROL}` at MetaLR's tuned parameters, less the hyper-gradient", True
    if lk == ck == "untuned":
        return "both untuned: the same starting rates", True
    if ck == "tuned":
        return (f"`{CONTROL}` tuned in its own study, so its learning rate is not MetaLR's: "
                "not like for like"), False
    if ck == "race":
        return (f"`{CONTROL}` tuned as its own arm of the race, so its learning rate is not "
                "MetaLR's: not like for like"), False
    return f"MetaLR {lk}, `{CONTROL}` {ck}: not like for like", False


def _planned(block: pd.DataFrame, metric: str) -> tuple[list[str], dict | None]:
    """MetaLR over ``discriminative`` (with how the control was tuned) and transfer (``full``)
    over ``scratch``, when present; and the MetaLR − control comparison for the cross-dataset
    sentence."""
    out, control = [], None
    for a, b, what in ((LEARNED, CONTROL, f"MetaLR's learned rates over its starting "
                        f"rates (`{CONTROL}`)"),
                       (BASELINE, LOWER_BOUND, f"Transfer over training from scratch "
                        f"(`{BASELINE}` − `{LOWER_BOUND}`)")):
        la, lb = _label_of(block, a, metric), _label_of(block, b, metric)
        if la is None or lb is None:
            continue
        row = compare(block, lb, metric, [la]).iloc[0]
        verdict = ("significant" if row["p"] < ALPHA else "not significant"
                   if not math.isnan(row["p"]) else "no test: fewer than 2 paired runs"
                   if row["n_pairs"] < MIN_PAIRS else "no test: the same difference on "
                   "every pair")
        test = "" if row["test"].startswith("no test") else f"{row['test']}, "
        how = ""
        if a == LEARNED:
            how, like = control_provenance(block, la, lb)
            how = f"; {how}"
            control = {"mean_diff": float(row["mean_diff"]), "p": float(row["p"]),
                       "test": row["test"], "n_pairs": int(row["n_pairs"]),
                       "like_for_like": like}
        out.append(f"{what}: {row['mean_diff']:+.3f} {METRIC_NAMES.get(metric, metric)} "
                   f"({test}{_fmt_p(row['p'])}, {verdict}{how}).")
    return out, control


def control_across(per_dataset: Mapping[str, DatasetAnswer], metric: str,
                   alpha: float = ALPHA) -> str | None:
    """MetaLR − its control over the datasets where it was like for like: the mean of the
    per-dataset paired differences, how many are positive, and a one-sample t-test of those
    differences against 0 (one value per dataset, so datasets are the units, as for Friedman)
    from 2 datasets; the datasets left out (a control tuned apart) are named."""
    rows = {ds: a.control for ds, a in per_dataset.items() if a.control is not None}
    if not rows:
        return None
    like = {ds: c["mean_diff"] for ds, c in rows.items()
            if c["like_for_like"] and not math.isnan(c["mean_diff"])}
    apart = [ds for ds, c in rows.items() if not c["like_for_like"]]
    name = METRIC_NAMES.get(metric, metric)
    text = "**MetaLR over its control across datasets** (like for like only): "
    if not like:
        return text + f"no dataset compares like with like ({', '.join(apart)} tuned apart)."
    d = np.array(list(like.values()))
    text += (f"mean paired difference {d.mean():+.3f} {name} over {len(d)} dataset"
             f"{'s' if len(d) != 1 else ''}, positive on {int((d > 0).sum())}")
    if len(d) >= MIN_PAIRS and np.ptp(d) > 0:
        res = sps.ttest_1samp(d, 0.0)
        verdict = "significant" if res.pvalue < alpha else "not significant"
        text += f" (t-test over datasets, {_fmt_p(float(res.pvalue))}, {verdict})"
    elif len(d) >= MIN_PAIRS:
        text += " (the same on every dataset: no spread, no p)"
    else:
        text += " (one dataset: no test over datasets)"
    if apart:
        text += (f"; left out, its control tuned in its own study: {', '.join(apart)}")
    return text + "."


# -- how many more seeds ------------------------------------------------------------------------------
def more_seeds(block: pd.DataFrame, best: str, tied: Sequence[str], metric: str,
               alpha: float = ALPHA, min_effect: float = MIN_EFFECT) -> pd.DataFrame:
    """Per tie: its paired difference with the best (tie − best, on (fold, seed)), the sd of the
    differences, the pairs, and the pairs a paired t-test at ``alpha`` with 80 % power needs to
    separate them if the observed difference is the truth (:func:`stats.seeds_needed`); None
    where |difference| < ``min_effect`` (too small to matter) or there is no spread."""
    keys = _pair_on(block)
    ref = block[block["strategy_label"] == best].set_index(keys)[metric]
    rows = []
    for s in tied:
        other = block[block["strategy_label"] == s].set_index(keys)[metric]
        both = pd.concat([other.rename("a"), ref.rename("b")], axis=1, join="inner").dropna()
        d = (both["a"] - both["b"]).to_numpy()
        mean = float(d.mean()) if len(d) else math.nan
        sd = float(d.std(ddof=1)) if len(d) > 1 else math.nan
        small = abs(mean) < min_effect
        rows.append({"strategy": s, "reference": best, "mean_diff": mean, "sd": sd,
                     "n_pairs": len(d), "too_small": small,
                     "pairs_needed": None if small else seeds_needed(mean, sd, alpha, POWER)})
    return pd.DataFrame(rows, columns=["strategy", "reference", "mean_diff", "sd", "n_pairs",
                                       "too_small", "pairs_needed"])


def _seeds_sentence(seeds: pd.DataFrame, best: str, block: pd.DataFrame, alpha: float,
                    min_effect: float) -> str | None:
    """Whether more seeds are worth buying to separate each tie from the best, and the command
    that prices them."""
    if seeds.empty:
        return None
    folds = block["fold"].nunique() if _pair_on(block) == ["fold", "seed"] else 1
    parts, most = [], 0
    for r in seeds.itertuples():
        head = f"{_code(r.strategy)} {r.mean_diff:+.3f} ± {r.sd:.3f} (sd of {r.n_pairs} pairs)"
        if r.too_small:
            parts.append(f"{head}: below `min_effect` {min_effect:g}, too small to matter")
        elif r.pairs_needed is None:
            parts.append(f"{head}: no spread to plan with")
        else:
            n = math.ceil(r.pairs_needed / folds)
            most = max(most, n)
            parts.append(f"{head}: {n} seed{'s' if n != 1 else ''}")
    text = (f"Seeds a paired t-test needs to separate each tie from {_code(best)} (α = "
            f"{alpha:g}, {POWER:.0%} power, the observed difference taken as the true one"
            + (f", {folds} folds per seed" if folds > 1 else "") + "): " + "; ".join(parts) + ".")
    if most:
        listed = " ".join(str(i) for i in range(most)) if most <= 12 else f"0 1 … {most - 1}"
        text += (f" Price {most} seeds with `run-benchmark plan --config <your config> "
                 f"--seeds {listed}`.")
    return text


# -- across datasets ----------------------------------------------------------------------------------
@dataclass
class CrossAnswer:
    n_blocks: int
    scores: pd.DataFrame  # blocks × strategies (strategies present in every block)
    ranks: pd.DataFrame  # blocks × strategies, 1 = best
    avg_ranks: pd.Series  # ascending
    friedman: FriedmanNemenyi | None
    best_everywhere: list[str]  # best or tied-best on every block
    sentences: list[str] = field(default_factory=list)


def cross_answer(per_dataset: dict[str, DatasetAnswer], scores: pd.DataFrame,
                 alpha: float = ALPHA) -> CrossAnswer:
    """Ranks and Friedman/Nemenyi over blocks (one per dataset), and where the datasets disagree."""
    scores = scores.dropna(axis=1, how="any")
    n, k = scores.shape
    if n < 2 or k < 2:
        need = 2 - n if n < 2 else 0
        why = (f"there is {n} dataset (a cross-validated dataset's folds are not datasets)"
               if n < 2 else f"only {k} strategy ran on every dataset")
        text = [f"**Across datasets**: no ranking or test, {why}; Friedman's test needs at "
                f"least 2 datasets and 2 strategies"
                + (f" ({need} more dataset{'s' if need != 1 else ''})" if need else "")
                + (f", and with {k} strategies it can reach p < {alpha:g} only from "
                   f"{min_blocks_for_friedman(k, alpha)} datasets" if k >= 2 else "") + "."]
        return CrossAnswer(n, scores, pd.DataFrame(), pd.Series(dtype=float), None, [], text)
    r = ranks(scores)
    avg = r.mean(axis=0).sort_values()
    fn = friedman_nemenyi(scores, alpha)
    top = str(avg.index[0])
    runner = f", then {_code(str(avg.index[1]))} ({avg.iloc[1]:.2f})" if k > 1 else ""
    text = [f"**Across the {n} datasets**: {_code(top)} has the best mean rank "
            f"({avg.iloc[0]:.2f} of {k} strategies){runner}."]
    need = min_blocks_for_friedman(k, alpha)
    sig = fn.p_value < alpha
    within = [str(s) for s in avg.index[1:] if avg[s] - avg.iloc[0] < fn.cd]
    ftext = (f"Friedman's test over datasets: χ² = {fn.statistic:.2f}, {_fmt_p(fn.p_value)} "
             f"({'significant' if sig else 'not significant'} at α = {alpha:g}); Nemenyi "
             f"critical difference {fn.cd:.2f} ranks")
    if within:
        ftext += f", within which {_list(within)} cannot be told apart from {_code(top)}"
    ftext += "."
    if n < need:
        ftext += (f" With {n} datasets and {k} strategies it cannot reach p < {alpha:g} whatever "
                  f"the results: at least {need} datasets are needed ({need - n} more).")
    text.append(ftext)
    common = set(scores.columns)
    everywhere = [s for s in avg.index
                  if all(s in a.tied_best for a in per_dataset.values()) and s in common]
    testable = all(a.testable for a in per_dataset.values())
    qual = "best or tied-best" if testable else "best (untested: too few seeds)"
    if everywhere:
        text.append(f"{_list(everywhere)} {'is' if len(everywhere) == 1 else 'are'} {qual} on "
                    f"every dataset.")
    else:
        text.append(f"No strategy is {qual} on every dataset.")
    disagree = []
    for ds, a in per_dataset.items():
        if a.best == top:
            continue
        if top in a.tied:
            disagree.append(f"on {ds} {_code(a.best)} is best and {_code(top)} cannot be told "
                            f"apart from it")
        elif top in a.untested:
            disagree.append(f"on {ds} {_code(a.best)} is best and {_code(top)} is not tested "
                            f"({a.untested[top]} paired run{'s' if a.untested[top] != 1 else ''})")
        elif top in a.constant:
            disagree.append(f"on {ds} {_code(a.best)} is best and {_code(top)} differs by "
                            f"{a.constant[top]:+.3f} on every pair (no p)")
        elif a.testable:
            row = a.comparisons[a.comparisons["strategy"] == top]
            diff = f" ({row['mean_diff'].iloc[0]:+.3f})" if len(row) else ""
            disagree.append(f"on {ds} {_code(top)} is significantly behind {_code(a.best)}{diff}")
        else:
            disagree.append(f"on {ds} {_code(a.best)} is best")
    text.append("Where the datasets disagree: " + "; ".join(disagree) + "." if disagree
                else f"The datasets agree: {_code(top)} is best on each.")
    return CrossAnswer(n, scores, r, avg, fn, everywhere, text)


# -- gains over full ----------------------------------------------------------------------------------
def gains_over_full(results: pd.DataFrame, metric: str, alpha: float = ALPHA) -> pd.DataFrame:
    """Per block and strategy: paired mean gain over ``full`` (on (fold, seed)), its test, Holm
    over the strategies of the block, ``significant``. Empty where a block has no ``full``."""
    frames = []
    for ds, block in with_blocks(results).groupby("block", sort=True):
        full = _label_of(block, BASELINE, metric)
        if full is None:
            continue
        c = compare(block, full, metric)
        c.insert(0, "dataset", ds)
        frames.append(c)
    if not frames:
        return pd.DataFrame(columns=["dataset", "strategy", "reference", "mean_diff", "test", "p",
                                     "n_pairs", "p_holm", "significant"])
    out = pd.concat(frames, ignore_index=True)
    out["significant"] = out["p_holm"] < alpha
    return out


def gain_heatmap(gains: pd.DataFrame, metric: str):
    """Datasets × strategies, each cell the paired gain over ``full``; ``*``: Holm p < α."""
    import matplotlib.pyplot as plt

    grid = gains.pivot(index="dataset", columns="strategy", values="mean_diff")
    marks = gains.pivot(index="dataset", columns="strategy", values="significant")
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) if grid.size else 1.0
    lim = lim if lim > 0 and not math.isnan(lim) else 1.0
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * grid.shape[1], 0.9 + 0.55 * grid.shape[0]))
    im = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=35, ha="right")
    ax.set_yticks(range(grid.shape[0]), grid.index)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid.iat[i, j]
            if not math.isnan(v):
                star = "*" if bool(marks.iat[i, j]) else ""
                ax.text(j, i, f"{v:+.3f}{star}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"gain in {METRIC_NAMES.get(metric, metric)} over full")
    ax.set_title(f"paired gain over full (* Holm p < {ALPHA:g})")
    fig.tight_layout()
    return fig


# -- the paragraph ------------------------------------------------------------------------------------
@dataclass
class Answer:
    per_dataset: dict[str, DatasetAnswer]
    across: CrossAnswer
    gains: pd.DataFrame

    control: str | None = None  # MetaLR over its control across datasets (control_across)

    def markdown(self) -> str:
        parts = [" ".join(a.sentences) for a in self.per_dataset.values()]
        parts.append(" ".join(self.across.sentences))
        if self.control:
            parts.append(self.control)
        return "\n\n".join(parts)


def the_answer(results: pd.DataFrame, metric: str, alpha: float = ALPHA,
               races: Mapping[str, str] | None = None,
               min_effect: float = MIN_EFFECT) -> Answer:
    """The report's opening paragraph from its finished runs (see the module docstring).
    ``races``: per dataset key, what a race spent (``results.race_notes``): those datasets'
    answers are marked as races."""
    blocked = with_blocks(results)
    races = races or {}
    per = {str(ds): dataset_answer(b, str(ds), metric, alpha, race=races.get(str(ds)),
                                   min_effect=min_effect)
           for ds, b in blocked.groupby("block", sort=True)}
    across = cross_answer(per, block_scores(results, metric), alpha)
    control = control_across(per, metric, alpha) if len(per) > 1 else None
    return Answer(per, across, gains_over_full(results, metric, alpha), control)
