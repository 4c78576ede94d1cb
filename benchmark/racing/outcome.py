"""What a race found and what it spent: one dataset's race (:class:`DatasetRace`), the
answer on the confirmation seeds (:func:`answer_race`: paired against the best, Holm-corrected,
the winner chosen on validation) and the price (:class:`Compute`: the race's training
iterations and wall time next to the full grid's, :func:`compute_spent`, :func:`grid_as_run`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from metalr_bench.benchmark.config import BenchmarkConfig, Cell
from metalr_bench.benchmark.planning.plan import (
    SplitSizes,
    StepTimings,
    cached_sizes,
    count_run,
    plan_rows,
)
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.benchmark.tracking.client import Tracker
from metalr_bench.benchmark.training.cell import CellResult
from metalr_bench.benchmark.tuning.race_study import (
    STRATEGY_PARAM,
    Leader,
    RaceSpec,
    trial_epochs,
)
from metalr_bench.reports.answer import ALPHA, dataset_answer
from metalr_bench.reports.stats import mean_ci


@dataclass
class Compute:
    """What a race spent and the full grid's price (train iterations: optimizer steps)."""

    search_iters: int
    confirm_iters: int
    grid_iters: int
    search_s: float
    confirm_s: float
    grid_s: float | None
    grid_s_how: str
    #: the full grid's iterations as it runs: its tuning trials counted at the epochs they
    #: trained (pruned ones stop early), its final runs in full (:func:`grid_as_run`)
    grid_run_iters: int | None = None
    grid_run_how: str = ""
    grid_run_estimated: bool = True

    @property
    def share_run_iters(self) -> float:
        return (self.race_iters / self.grid_run_iters if self.grid_run_iters else math.nan)

    @property
    def race_iters(self) -> int:
        return self.search_iters + self.confirm_iters

    @property
    def race_s(self) -> float:
        return self.search_s + self.confirm_s

    @property
    def share_iters(self) -> float:
        return self.race_iters / self.grid_iters if self.grid_iters else math.nan

    def sentence(self) -> str:
        grid_time = ("" if self.grid_s is None else
                     f", against {duration(self.grid_s)} for the grid ({self.grid_s_how})")
        as_run = ""
        if self.grid_run_iters:
            word = "an estimated " if self.grid_run_estimated else "the "
            as_run = (f"{100 * self.share_run_iters:.1f} % of {word}{self.grid_run_iters:,} the "
                      f"full grid spends as it runs, with its pruning ({self.grid_run_how}), and ")
        return (f"The race spent {self.race_iters:,} training iterations ({self.search_iters:,} "
                f"searching, {self.confirm_iters:,} confirming), {as_run}"
                f"{100 * self.share_iters:.1f} % of the {self.grid_iters:,} that "
                f"`run-benchmark plan` counts for the full grid (every trial at its full "
                f"epochs: an upper bound), in {duration(self.race_s)} of trial and run time "
                f"(their durations summed, over workers too: not wall time){grid_time}.")


@dataclass
class DatasetRace:
    """One dataset's race: the search, the confirmation, the answer, the model."""

    dataset: str
    study_name: str
    counts: dict[str, int]
    board: list[Leader]
    confirmed: list[str] = field(default_factory=list)
    results: list[CellResult] = field(default_factory=list)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    answer: list[str] = field(default_factory=list)
    best_on_test: str | None = None
    tied: list[str] = field(default_factory=list)
    winner: str | None = None
    winner_seed: int | None = None
    winner_run_id: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    compute: Compute | None = None
    error: str | None = None
    #: every named strategy's line (:func:`tuning.race_study.standings`)
    strategies: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "study_name": self.study_name, "trials": self.counts,
            "search": [asdict(b) for b in self.board],
            "strategies": self.strategies,
            "confirmed": self.confirmed,
            "confirmation": json.loads(self.table.to_json(orient="records"))
            if not self.table.empty else [],
            "answer": " ".join(self.answer), "best_on_test": self.best_on_test,
            "tied_with_best": self.tied,
            "winner": {"strategy": self.winner, "seed": self.winner_seed,
                       "run_id": self.winner_run_id, "chosen_on": "validation"},
            "model": self.model,
            "compute": None if self.compute is None else {
                **asdict(self.compute), "race_iters": self.compute.race_iters,
                "race_s": self.compute.race_s, "share_iters": self.compute.share_iters,
                "share_run_iters": self.compute.share_run_iters},
            "error": self.error,
        }


@dataclass
class RaceOutcome:
    parent_run_id: str
    experiment_id: str
    races: list[DatasetRace]
    summary_path: Path

    @property
    def failed(self) -> list[str]:
        out = [f"{r.dataset}: {r.error}" for r in self.races if r.error]
        out += [f"{r.cell.dataset.dataset_key} {r.cell.strategy_label} seed={r.cell.seed}: {r.error}"
                for race in self.races for r in race.results if r.status != "FINISHED"]
        return out


def race_metrics(rcfg: BenchmarkConfig) -> tuple[str, str, bool]:
    """(the answer's test metric, the validation metric that picks the winner, higher better)."""
    m = rcfg.tune.metric
    if m == "val_loss":
        return f"test_{rcfg.selection_metric}", "best_val_loss", False
    return f"test_{m}", f"best_val_{m}", True


def answer_race(rcfg: BenchmarkConfig, race: DatasetRace) -> None:
    """The confirmation's table, the answer marked as a race, and the winner on validation."""
    metric, val_key, higher = race_metrics(rcfg)
    rows = [{"dataset_key": race.dataset, "strategy": r.cell.strategy,
             "strategy_label": r.cell.strategy, "seed": r.cell.seed, "run_id": r.run_id,
             # each strategy at its own arm's best parameters (the answer's control line)
             "config_hash": r.config_hash, "tuned": "race",
             metric: r.summary.get(metric, math.nan), val_key: r.summary.get(val_key, math.nan),
             "mean_epoch_time_s": r.summary.get("mean_epoch_time_s", math.nan)}
            for r in race.results if r.status == "FINISHED"]
    if not rows:
        race.error = "no confirmation run finished"
        return
    block = pd.DataFrame(rows)
    assert race.compute is not None
    ans = dataset_answer(block, race.dataset, metric, ALPHA, race=race.compute.sentence())
    race.answer, race.best_on_test, race.tied = ans.sentences, ans.best, ans.tied
    comp = ans.comparisons.set_index("strategy") if len(ans.comparisons) else None
    table = []
    for s in race.confirmed:
        sub = block[block["strategy"] == s]
        if sub.empty:
            continue
        m, sd, lo, hi, n = mean_ci(sub[metric])
        lead = next(b for b in race.board if b.strategy == s)
        row = {"strategy": s, "search_best": lead.value, "search_trial": lead.trial_number,
               "params": {k: v for k, v in lead.values.items() if k != "strategy"},
               f"{metric}_mean": m, f"{metric}_std": sd, "ci_low": lo, "ci_high": hi,
               "n_seeds": n, f"{val_key}_mean": float(sub[val_key].mean())}
        if comp is not None and s in comp.index:
            row |= {"diff_vs_best": float(comp.at[s, "mean_diff"]),
                    "p_holm": float(comp.at[s, "p_holm"]), "test": str(comp.at[s, "test"])}
        table.append(row)
    race.table = pd.DataFrame(table)
    # the winner: chosen on validation, never on test (the registered model's test metric
    # stays an honest estimate); its seed: the run with the best validation value
    val = block.groupby("strategy")[val_key].mean().dropna()
    if val.empty:
        return
    race.winner = str(val.idxmax() if higher else val.idxmin())
    runs = block[block["strategy"] == race.winner].sort_values(
        [val_key, "seed"], ascending=[not higher, True])
    best = runs.iloc[0]
    race.winner_seed, race.winner_run_id = int(best["seed"]), str(best["run_id"])


def compute_spent(rcfg: BenchmarkConfig, cfg: BenchmarkConfig, spec: RaceSpec,
                  study: optuna.Study, results: list[CellResult], tracker: Tracker,
                  timings: StepTimings | None) -> Compute:
    """Training iterations as `run-benchmark plan` counts them, for the trials (the epochs each
    reported: pruned ones stop early) and the confirmation runs, next to the plan of the full
    grid of this dataset (every strategy tuned with the config's ``tune.n_trials``, then every
    seed); wall time measured (trials' and runs' start to end)."""
    sizes: dict[str, SplitSizes] = {}
    search = 0
    for strategy, epochs, _ in trial_epochs(study):
        if strategy not in spec.arms or epochs == 0:
            continue
        cell = Cell(dataset=spec.dataset, strategy=strategy, params=spec.arms[strategy].fixed,
                    seed=rcfg.tune.seed)
        search += count_run(rcfg, cell, cached_sizes(sizes, spec.dataset), epochs=epochs,
                            evaluate_test=False).train_steps
    confirm = sum(count_run(rcfg, r.cell, cached_sizes(sizes, spec.dataset), epochs=rcfg.epochs,
                            evaluate_test=True).train_steps for r in results)
    search_s = sum((tr.datetime_complete - tr.datetime_start).total_seconds()
                   for tr in study.get_trials(deepcopy=False)
                   if tr.datetime_start is not None and tr.datetime_complete is not None)
    confirm_s = 0.0
    for r in results:
        if not r.run_id:
            continue
        info = tracker.client.get_run(r.run_id).info
        if info.end_time and info.start_time:
            confirm_s += (info.end_time - info.start_time) / 1000
    grid_cfg = cfg.model_copy(update={
        "datasets": [spec.dataset], "seeds": rcfg.seeds,
        "tune": cfg.tune.model_copy(update={"enabled": True})})
    rows = plan_rows(grid_cfg, timings, sizes)
    grid_iters = sum(r.train_steps for r in rows)
    run_iters, run_how, estimated = grid_as_run(grid_cfg, spec, study, tracker, sizes, rows)
    if timings is not None:
        grid_s: float | None = sum(r.seconds or 0.0 for r in rows)
        how = f"`run-benchmark plan` at the step times of {timings.device}"
    elif search + confirm:
        grid_s = (search_s + confirm_s) / (search + confirm) * grid_iters
        how = "at the race's own measured time per iteration; `--timings` prices it as `plan`"
    else:
        grid_s, how = None, ""
    return Compute(search, confirm, grid_iters, search_s, confirm_s, grid_s, how,
                   run_iters, run_how, estimated)


def grid_as_run(grid_cfg: BenchmarkConfig, spec: RaceSpec, study: optuna.Study,
                tracker: Tracker, sizes: dict[str, SplitSizes], rows: list[Any],
                ) -> tuple[int | None, str, bool]:
    """The full grid's training iterations with its pruning: (iterations, how, estimated).

    `plan`'s price counts every tuning trial at its full epochs, but the grid's median pruner
    stops most trials early, so a share against it flatters the race. Per strategy: when the
    grid's study of that strategy ran in this experiment (its MLflow trial runs, tagged with
    the same study name as the race's arm), its trials' mean iterations (epochs each trained,
    from its ``train_loss`` history) times ``tune.n_trials``; else an estimate: `plan`'s
    tuning iterations times the race's own pruning rate (its search trials' iterations over
    the same trials at full epochs; Hyperband, not the grid's median pruner, so said to be
    an estimate). The final grid's runs count in full.
    """
    tuning = {r.strategy: r.train_steps for r in rows if r.phase == "tuning"}
    final = sum(r.train_steps for r in rows if r.phase == "final")
    n_trials = grid_cfg.tune.n_trials
    full = grid_cfg.tune.epochs or grid_cfg.epochs
    # the race's own pruning rate, top-ups (unpruned by design) left out
    spent = at_full = 0
    for tr in study.get_trials(deepcopy=False):
        s = tr.params.get(STRATEGY_PARAM)
        if s not in spec.arms or tr.user_attrs.get("race.top_up") or not tr.intermediate_values:
            continue
        cell = Cell(dataset=spec.dataset, strategy=s, params=spec.arms[s].fixed,
                    seed=grid_cfg.tune.seed)
        one = count_run(grid_cfg, cell, cached_sizes(sizes, spec.dataset), epochs=1,
                        evaluate_test=False).train_steps
        spent += one * len(tr.intermediate_values)
        at_full += one * full
    rate = spent / at_full if at_full else None
    total, measured, n_runs = final, [], 0
    for s, arm in spec.arms.items():
        name = arm.name.replace("'", "\\'")
        runs = tracker.search_runs(f"tags.{T.KIND} = '{T.KIND_TRIAL}' and "
                                   f"tags.`{T.STUDY_NAME}` = '{name}'")
        epochs = [len(tracker.client.get_metric_history(r.info.run_id, "train_loss"))
                  for r in runs]
        epochs = [e for e in epochs if e > 0]
        if epochs:
            cell = Cell(dataset=spec.dataset, strategy=s, params=arm.fixed, seed=grid_cfg.tune.seed)
            one = count_run(grid_cfg, cell, cached_sizes(sizes, spec.dataset), epochs=1,
                            evaluate_test=False).train_steps
            total += round(n_trials * one * sum(epochs) / len(epochs))
            measured.append(s)
            n_runs += len(epochs)
        elif rate is not None:
            total += round(tuning.get(s, 0) * rate)
        else:
            return None, "", True
    if len(measured) == len(spec.arms):
        return total, (f"measured: the grid's {n_runs} trial runs in this experiment, at the "
                       f"epochs they trained, scaled to {n_trials} trials per strategy"), False
    how = (f"estimated at the race's own pruning rate, its trials trained "
           f"{100 * (rate or 0):.0f} % of their epochs")
    if measured:
        how += f"; measured for {', '.join(measured)} from the grid's {n_runs} trial runs"
    return total, how, True


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"

