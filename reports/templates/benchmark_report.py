# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # metalr-bench report
#
# Which fine-tuning strategy transfers a pre-trained network best to a small medical dataset?
# This report is regenerated from the MLflow store alone (`run-benchmark report --experiment NAME`):
# every number below is read from MLflow runs, never from the benchmark's memory.
# Test metrics are those of the checkpoint chosen on the **validation** split.

# %% tags=["parameters"]
tracking_uri = "sqlite:///mlflow.db"  # MLflow store holding the benchmark
experiment = "quick"  # MLflow experiment name, i.e. the benchmark name
parent_run_id = ""  # benchmark parent run id(s), comma-separated; empty: the latest one
output_dir = "."  # where the report's side files go (not used for reading)
primary_metric = "test_auc"  # metric used for ranks, paired tests and the CD diagram
ci_level = 0.95  # confidence level of the intervals
min_effect = None  # smallest difference worth more seeds; None: the parent run's `min_effect`

# %%
import warnings

warnings.filterwarnings("ignore")  # library chatter must not end up in the report
import html
import json
import os
import platform
from importlib import metadata

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import HTML, Markdown, display

from metalr_bench.reports import figures, results as res, stats, tables

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.titlesize": 10})


def show(fig, alt):
    """Display a figure as an inline PNG with alt text, and free it."""
    display(HTML(figures.figure_html(fig, alt)))


runs = res.load_runs(tracking_uri, experiment, parent_run_id or None)
all_results = res.results_table(runs)
if all_results.empty:
    raise RuntimeError(f"the parent run(s) {runs.parent_ids} have no child runs to report on")
results = all_results[all_results["status"] == "FINISHED"].copy()
failed = all_results[all_results["status"] != "FINISHED"]
metrics = [m for m in res.TEST_METRICS if m in results]
if primary_metric not in metrics:
    raise ValueError(f"primary_metric={primary_metric!r} is not logged; available: {metrics}")
hist = res.with_cell(res.metric_histories(tracking_uri, runs), results)
drift = res.with_cell(res.drift_table(results), results)
groups = res.group_order(results)
datasets = sorted(results["dataset_key"].unique())
strategies = sorted(results["strategy_label"].unique())
parent = res.parent_provenance(tracking_uri, runs)
display(HTML(tables.CSS))
display(Markdown(
    f"**Experiment** `{runs.experiment_name}` · **parent run** `{', '.join(runs.parent_ids)}` "
    f"(started {parent['start_time']:%Y-%m-%d %H:%M} UTC, status {parent['status']}) · "
    f"**{len(results)} finished runs**: {len(datasets)} dataset(s) × {len(strategies)} "
    f"strateg{'y' if len(strategies) == 1 else 'ies'} × {results['seed'].nunique()} seed(s)"
    + (f" · **{len(failed)} run(s) did not finish** (listed under Provenance)" if len(failed) else "")
))
if starts := res.pretraining_markdown(res.pretraining_table(tracking_uri, runs)):
    display(Markdown(starts))

# %% [markdown]
# ## The answer
#
# Written from the statistics below (`metalr_bench.reports.answer`). Per dataset: the best
# strategy on the primary metric and those that cannot be told apart from it (each paired with
# the best on seeds, and on (fold, seed) for a cross-validated dataset; the test named; Holm's
# correction over the dataset's comparisons at α = 0.05), time per epoch relative to `full`, and
# where the grid has them, MetaLR's learned rates against `discriminative` and transfer against
# `scratch`. Across datasets: mean ranks, Friedman's test and the Nemenyi critical difference,
# one block per dataset (the folds of a cross-validated dataset are one dataset, not several).
# A strategy with fewer than 2 paired runs is "not tested", never a tie; one that differs by the
# same amount on every pair is reported with that difference (no spread, no p). For each tie:
# the paired difference with the best, its sd, and the seeds a paired t-test would need to
# separate them (α = 0.05, 80 % power), or "too small to matter" below `min_effect`. The
# MetaLR-over-control line says how the control was tuned (at MetaLR's tuned parameters, or in a
# study of its own: then not like for like), and a last line pools it over datasets.
# The heat-map shows each strategy's paired gain over `full` (`*`: Holm p < 0.05).

# %%
from metalr_bench.reports import answer as answer_mod

if min_effect is None:  # the config's `min_effect`, logged on the parent run
    min_effect = float(runs.parents[0].data.params.get("min_effect", answer_mod.MIN_EFFECT))
the_answer = answer_mod.the_answer(results, primary_metric, races=res.race_notes(runs),
                                   min_effect=min_effect)
display(Markdown(the_answer.markdown()))
if not the_answer.gains.empty:
    show(answer_mod.gain_heatmap(the_answer.gains, primary_metric),
         "heat-map of each strategy's paired gain over full")

# %% [markdown]
# ## Leaderboard
#
# Test metrics per dataset and strategy over seeds: **mean ± standard deviation [95% confidence
# interval from the t-distribution, clipped to [0, 1]]**. The best mean per dataset and metric
# is in bold; the rank (1 = best) is on the primary metric. A dataset is a (dataset, image size)
# pair.

# %%
board = tables.leaderboard(results, metrics, primary_metric, ci_level)
if (mixed := tables.mixed_code_warning(results)) is not None:
    display(Markdown(f"**Warning:** {mixed}"))
display(HTML(tables.leaderboard_html(board, metrics, primary_metric)))

# %% [markdown]
# ### Published numbers beside ours
#
# The config's `references:` rows (logged to the parent run as `references.json`) for the same
# dataset and image size, marked *published*: shown, never ranked or tested with our runs (one
# published number per row, from another protocol, with no per-seed values to pair).

# %%
from metalr_bench.reports import references as refs_mod

published = refs_mod.matching(refs_mod.load_references(tracking_uri, runs), results)
if published.empty:
    display(Markdown("_No published reference for these datasets and sizes (config key "
                     "`references:`, e.g. `references/medmnist.yaml`)._"))
else:
    display(HTML(refs_mod.leaderboard_with_published_html(board, published, metrics,
                                                          primary_metric)))
    display(Markdown("**Protocols differ**:\n\n" + "\n".join(
        f"- {line}" for line in refs_mod.protocol_note(published, results))))

# %% [markdown]
# ### Average rank across datasets
#
# Rank of each strategy on every dataset (by the mean of the primary metric over seeds) and the
# average over datasets; lower is better. A cross-validated dataset is one dataset here, its
# folds and seeds pooled (its folds are dependent splits, not independent datasets).

# %%
block_board = tables.leaderboard(answer_mod.with_blocks(results), [primary_metric],
                                 primary_metric, ci_level, by="block")
avg = tables.average_ranks(block_board, primary_metric)
display(HTML(tables.average_ranks_html(avg)))

# %% [markdown]
# ## Paired statistics
#
# Per dataset, every strategy against the best one, paired on seeds (same seed = same split and
# initialisation). The test is named in each row: Wilcoxon signed-rank with ≥ 6 seeds, otherwise a
# paired t-test (Wilcoxon cannot reach p < 0.05 with fewer pairs). p < 0.05 in bold. With few
# seeds these tests have little power: a large p-value is *not* evidence that two strategies are equal.

# %%
paired = tables.paired_vs_best(results, board, primary_metric)
if paired.empty:
    display(Markdown("_Only one strategy: nothing to compare._"))
else:
    display(HTML(tables.paired_html(paired)))

# %% [markdown]
# ### Across datasets: Friedman test and critical-difference diagram
#
# Friedman's test on the per-dataset ranks; if strategies differ, the Nemenyi critical difference
# (CD) says which average ranks are far enough apart. Strategies joined by a thick bar are **not**
# significantly different (Demšar 2006). Needs at least 3 datasets.

# %%
scores = block_board.pivot(index="dataset", columns="strategy",
                          values=f"{primary_metric}_mean")
if len(scores) >= 3 and len(strategies) >= 2:
    fn = stats.friedman_nemenyi(scores)
    display(Markdown(
        f"Friedman χ² = {fn.statistic:.3f}, p = {fn.p_value:.3g} ({fn.n_datasets} datasets, "
        f"{fn.n_strategies} strategies); Nemenyi CD at α = {fn.alpha} is **{fn.cd:.3f}** ranks."
    ))
    show(figures.cd_diagram(fn.avg_ranks, fn.cd, stats.cliques(fn.avg_ranks, fn.cd),
                            title=f"critical difference on {primary_metric}"), "critical-difference diagram")
else:
    display(Markdown(f"_Skipped: the diagram needs ≥ 3 datasets and ≥ 2 strategies "
                     f"(this benchmark has {len(scores)} and {len(strategies)}; the folds of "
                     f"a cross-validated dataset count as one)._"))

# %% [markdown]
# ## Cross-validation: the folds pooled
#
# A dataset run with `n_folds` (k-fold cross-validation by patient or video) is one dataset per
# fold above. Here its folds come together, as in the MetaLR paper: the leaderboard over all
# (fold, seed) runs, paired tests that pair strategies on (fold, seed), and the paper's figures on
# the **pooled** test predictions (every image predicted once, by the fold that held it out):
# pooled accuracy, AUC on the pooled predictions, per-class precision / recall / F1 (mean ± std
# over seeds) and the pooled confusion matrix (summed over folds and seeds).

# %%
cv = results[results["fold"].notna()] if "fold" in results else results.iloc[0:0]
if cv.empty:
    display(Markdown("_No cross-validated dataset in this benchmark: give `n_folds` (without "
                     "`fold`) on an `imagefolder`, `csv` or `pocus` entry to run every fold._"))
else:
    cv_board = tables.leaderboard(cv, metrics, primary_metric, ci_level, by="cv_key")
    display(Markdown("**Over folds × seeds** (mean ± std [CI])"))
    display(HTML(tables.leaderboard_html(cv_board, metrics, primary_metric,
                                         table_id="cv-leaderboard")))
    cv_paired = tables.paired_vs_best(cv, cv_board, primary_metric, by="cv_key",
                                      pair_on=("fold", "seed"))
    if not cv_paired.empty:
        display(Markdown("**Paired on (fold, seed)**"))
        display(HTML(tables.paired_html(cv_paired, table_id="cv-paired-tests")))
    preds = res.test_predictions(tracking_uri, cv)
    pooled = tables.pooled_cv(cv, preds)
    if pooled.empty:
        display(Markdown("_These runs logged no test predictions (`predictions/test.csv`; "
                         "runs of older versions, or multi-label tasks): no pooled figures._"))
    else:
        display(Markdown("**Pooled test predictions** (mean ± std over seeds)"))
        display(HTML(tables.pooled_cv_html(pooled)))
        mats = tables.confusion(cv, preds)
        for ds in sorted({d for d, _ in mats}):
            show(figures.confusion_matrices({s: m for (d, s), m in mats.items() if d == ds},
                                            f"{ds}: pooled confusion matrices"),
                 f"pooled confusion matrices of {ds}")

# %% [markdown]
# ## Did each strategy act?
#
# A row of the leaderboard measures its method only if the method did something. Each strategy
# names the figure that shows its mechanism acted (its run tag `mechanism`, a metric logged every
# epoch): the penalty's share of the loss (L2-SP, DELTA, BSS), the spread max/min of the
# per-group learning rates (layer-wise and learned rates), the share of parameters trained
# (partial fine-tuning), the linear probe's training loss (LP-FT). Start and end: the metric's
# first and last logged value, mean over seeds (and folds). A penalty at under 0.01 % of the loss,
# or learning rates that spread by less than 1.1×, make the strategy plain fine-tuning under
# another name.

# %%
from metalr_bench.reports import mechanisms as mech

mech_keys = mech.mechanism_keys(results)
mech_hist = (res.metric_histories(tracking_uri, runs, mech_keys, lr=False) if mech_keys
             else pd.DataFrame(columns=["run_id", "key", "step", "value"]))
acted = mech.mechanism_table(results, mech_hist)
if not mech_keys:
    display(Markdown("_No run carries a `mechanism` tag (runs of an earlier version, or only "
                     "strategies without one such as `full`)._"))
display(HTML(mech.mechanism_html(acted)))

# %% [markdown]
# ## What learning the rates buys: MetaLR against `discriminative`
#
# MetaLR starts from a fixed backbone/head learning-rate ratio and then learns the rates;
# `discriminative` keeps MetaLR's starting rates, head pin and schedule without the
# hyper-gradient. Their paired difference on the primary metric (paired on seeds; on (fold, seed)
# for a cross-validated dataset's folds pooled) is the gain that learning the rates buys, with a
# t-interval and the test named (paired t-test below 6 pairs, Wilcoxon signed-rank from 6).

# %%
from metalr_bench.reports import learned_rates as lr_gain

gain = lr_gain.learned_rates_gain(results, primary_metric, ci_level)
if gain.empty:
    display(Markdown("_No dataset has runs of both `metalr` and `discriminative`: nothing to "
                     "say about what learning the rates buys._"))
else:
    display(Markdown("\n".join(f"- {line}" for line in gain["sentence"])))
for ds in lr_gain.missing_control(results):
    display(Markdown(f"_On {ds}: `metalr` without its control `discriminative` (add it to the "
                     "grid to see what learning the rates buys)._"))

# %% [markdown]
# ## Learning curves
#
# Validation metric and losses per epoch: the line is the mean over seeds, the band ± 1 standard
# deviation.

# %%
if hist.empty:
    display(Markdown("_No per-epoch metrics were logged._"))
else:
    show(figures.learning_curves(hist), "learning curves")

# %% [markdown]
# ## Learning rate per layer group
#
# MetaLR learns one learning rate per layer group during training (Chen et al., MICCAI 2023,
# Fig. 4): layers whose features transfer well keep a small rate, layers that must adapt get a
# larger one. Mean over seeds (± 1 std), log scale. Other layer-wise strategies are shown for
# contrast; strategies with a single learning rate for the whole network are left out.

# %%
lr_hist = hist[hist["key"].str.startswith("lr/")] if not hist.empty else hist
if lr_hist.empty:
    display(Markdown("_No learning rates per layer group were logged._"))
else:
    # layer-wise = more than one distinct learning rate across groups or epochs
    varied = lr_hist.groupby("strategy_label")["value"].agg(lambda v: v.round(12).nunique())
    layerwise = varied[varied > 1].index
    if "metalr" not in set(results["strategy"]):
        display(Markdown("_No MetaLR runs in this benchmark; showing the other layer-wise "
                         "strategies' schedules._"))
    if len(layerwise) == 0:
        display(Markdown("_No strategy uses more than one learning rate._"))
    else:
        show(figures.lr_per_group(lr_hist[lr_hist["strategy_label"].isin(layerwise)], groups),
             "learning rate per layer group")

# %% [markdown]
# ## How far each layer moved
#
# Relative drift of each layer group from the pre-trained weights,
# ‖θ<sub>final</sub> − θ<sub>pretrained</sub>‖ / ‖θ<sub>pretrained</sub>‖, mean over seeds.
# Regularised or partly frozen strategies should stay close to 0 in the early layers.

# %%
if drift.empty:
    display(Markdown("_No drift metrics were logged._"))
else:
    show(figures.drift_heatmap(drift, groups), "drift heat-map")

# %% [markdown]
# ## Why a strategy wins: transferability of each layer next to its learning rate
#
# Transferability of a layer group (Chen et al. 2022) in every run that starts from pre-trained
# weights: T = D(θ<sub>r</sub>, θ<sub>B</sub>) / D(θ<sub>A</sub>, θ<sub>B</sub>), with
# θ<sub>A</sub> the pre-trained start, θ<sub>B</sub> the selected fine-tuned checkpoint,
# θ<sub>r</sub> the random initialisation the pre-training started from (run param
# `transferability_reference: pretrain_start`; for external weights, whose start is unknown, an
# independent random draw, `random_draw`, with `transferability_seed`; each panel says which)
# and D the mean absolute difference of the group's convolution and
# linear weights (averaged per layer). **T > 1**: pre-training put the layer closer to where
# fine-tuning ended than a random start would be; the higher, the more of the layer carried over.
# Mean over seeds (± 1 std), log scale; full fine-tuning, the paper's reference, is the thick
# line. The head is re-initialised in every run, so it has no T; a group a strategy froze did not
# move and has none either. A layer-wise strategy's own T follows its own learning rates (a
# group with a small rate barely moves, so its T is high), which is why the learning rates are set
# against **full fine-tuning's** T: for each strategy whose logged learning rates differ across
# layer groups, the mean rate of each group over training against that group's T, with
# Spearman's rank correlation (exact p-value up to 9 groups). Reading: p < 0.05 and ρ < 0:
# anti-correlated (well-transferring layers get smaller rates, MetaLR's premise); p < 0.05 and
# ρ > 0: correlated; otherwise not significantly correlated (with 4 layer groups no p can fall
# below 0.05, even at ρ = −1). The correlation is computed only where the final rates spread
# (max/min of the final group learning rates ≥ 1.1×); otherwise the rates did not move and the
# report gives their spread.

# %%
from metalr_bench.reports import transferability as tf

trans = res.with_cell(tf.transferability_table(results), results)
why = tf.missing_reason(results, trans)
if why:
    display(Markdown(f"_{why}_"))
else:
    palette = figures.colours(strategies)
    theta_r = tf.reference_labels(results)
    show(figures.transferability_profile(trans, groups, palette, subtitles=theta_r),
         "transferability per layer group")
    display(Markdown("\n".join(f"- {ds}: {words}" for ds, words in sorted(theta_r.items()))))
    lr_t = tf.lr_against_transferability(trans, tf.mean_lrs(hist), groups)
    for note in lr_t.notes:
        display(Markdown(f"_{note}_"))
    if not lr_t.correlations.empty:
        display(Markdown("\n".join(f"- {line}" for line in lr_t.correlations["sentence"])))
        show(figures.lr_vs_transferability(lr_t.points, lr_t.correlations, palette),
             "learning rate against transferability")
        display(HTML(tf.correlations_html(lr_t.correlations)))

# %% [markdown]
# ## Hyper-parameter tuning (Optuna)

# %%
studies = res.find_studies(tracking_uri, runs.experiment_id)
if not studies:
    display(Markdown("_No Optuna study is recorded in this experiment (runs tagged "
                     "`optuna.study_name` / `optuna.storage`); run the tuner to fill this section._"))
for info in studies:
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=info["study_name"], storage=info["storage"])
        done = [t for t in study.trials if t.state.name == "COMPLETE"]
    except Exception as exc:  # a moved or deleted storage must not break the report
        display(Markdown(f"_Study `{info['study_name']}` at `{info['storage']}` could not be "
                         f"loaded: {type(exc).__name__}: {exc}_"))
        continue
    if not done:
        display(Markdown(f"_Study `{info['study_name']}` has no completed trial yet._"))
        continue
    display(Markdown(
        f"**Study `{study.study_name}`** ({len(done)} completed trials of {len(study.trials)}); "
        f"best value {study.best_value:.4f} with `{json.dumps(study.best_params)}`"
    ))
    for fig in figures.optuna_figures(study):
        show(fig, f"optuna study {study.study_name}")

# %% [markdown]
# ## Cost
#
# Per strategy: trainable parameters (run param `n_trainable_params`), wall time per epoch and
# peak memory, mean over seeds (the bars: mean ± std). Peak memory is the largest sample of
# MLflow's system metric `system/system_memory_usage_megabytes` (the host's memory in use while
# the run trained) where the run logged system metrics; else the run's `peak_memory_mb` (GPU:
# `torch.cuda.max_memory_allocated`; CPU: the process's peak resident memory, shared by all runs
# in one process).

# %%
from metalr_bench.reports import cost as cost_mod

if len(results):
    results = res.with_peak_memory(tracking_uri, results)
cost_cols = [c for c in ("mean_epoch_time_s", "peak_memory_mb", "total_time_s") if c in results]
if cost_cols:
    show(figures.cost_bars(results), "cost per strategy")
cost = cost_mod.cost_table(results)
if not cost.empty:
    display(HTML(cost.to_html(index=False, table_id="cost", classes="metalr-table", border=0)))

# %% [markdown]
# ## Provenance
#
# What produced these numbers: the benchmark's config, code version, packages and hardware
# (from the parent run's tags), and the software that rendered this report.

# %%
tags = parent["tags"]
prov = {
    "tracking URI": tracking_uri,
    "experiment": f"{runs.experiment_name} (id {runs.experiment_id})",
    "parent run(s)": ", ".join(runs.parent_ids),
    "git commit": tags.get("mlflow.source.git.commit", "unknown"),
    "metalr-bench": tags.get("metalr_bench.version", "unknown"),
    "torch (run)": tags.get("torch", "unknown"),
    "python (run)": tags.get("python", "unknown"),
    "host": tags.get("host", "unknown"),
    "GPU": tags.get("cuda", "unknown"),
    "benchmark wall time": (str(parent["end_time"] - parent["start_time"]).split(".")[0]
                            if parent["end_time"] is not None else "still running"),
}
for pkg in ("mlflow", "optuna", "pandas", "scipy", "matplotlib", "papermill", "torch"):
    try:
        prov[f"{pkg} (report)"] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
        pass
prov["platform (report)"] = platform.platform()
display(HTML(pd.Series(prov, name="value").rename_axis("item").reset_index()
             .to_html(index=False, table_id="provenance", classes="metalr-table", border=0)))
if len(failed):
    display(Markdown("**Runs that did not finish** (left out of every table and figure):"))
    display(HTML(failed[["run_name", "status", "run_id"]].to_html(
        index=False, table_id="failed-runs", classes="metalr-table", border=0)))
if parent["config"] is not None:
    text = json.dumps(parent["config"], indent=2)
    display(HTML(f"<details><summary><b>config.json</b> of the parent run</summary>"
                 f"<pre>{html.escape(text)}</pre></details>"))
