"""`run-benchmark race`: which strategy for a new dataset, at a fraction of the full grid.

A researcher with a new dataset does not want to pay for the full grid (every strategy × its
trials × 5 seeds) to learn which strategy to use. Per dataset, the race

1. **searches**: one Optuna study whose first choice is the strategy, then that strategy's own
   (grid) search space, Hyperband-pruned on the per-epoch validation metric
   (:mod:`metalr_bench.benchmark.tuning.race`); trials are MLflow child runs of the study's run,
   and a killed race re-run with the same command continues the same study;
2. **confirms**: each of the top ``k`` strategies' best configuration on 5 seeds (the config's
   seeds when it sets them), as ordinary cells through the grid's runner (MLflow runs, skipped
   when FINISHED on a re-run); the answer (:func:`reports.answer.dataset_answer`, marked as a
   race) pairs them on seeds against the best, Holm-corrected;
3. **prices** what it spent, training iterations (counted as ``run-benchmark plan`` counts them)
   and wall time (measured), next to the plan's price of the full grid of the same config;
4. **hands over the model**: the winner, chosen on *validation* (its mean best validation metric
   over the confirmation seeds, then its seed with the best one; never the test split), is its
   run's selected checkpoint, logged as an MLflow model with a signature, an input example and
   its preprocessing (:mod:`training.export`), and with ``register`` registered in the MLflow
   Model Registry, tagged with the race's parent run.

MLflow layout::

    race parent run (kind=race)           race/summary.json, race.<dataset>.* metrics
    ├── study run per dataset (kind=study, optuna.study_name = the race's study)
    │   └── trial run per trial (kind=trial, strategy tag = the trial's strategy)
    ├── confirmation cell runs (kind=cell, tuned=true, optuna.study_name = the race's study)
    └── model run per dataset (kind=model): the MLflow model, preprocessing.json, test metrics
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from metalr_bench.benchmark.config import BenchmarkConfig, Cell, ConfigError
from metalr_bench.benchmark.planning.plan import (
    SplitSizes,
    StepTimings,
    cached_sizes,
    count_run,
    plan_rows,
)
from metalr_bench.benchmark.running.executors import get_executor
from metalr_bench.benchmark.running.preflight import preflight
from metalr_bench.benchmark.running.runner import environment_tags, run_cell
from metalr_bench.benchmark.running.signals import terminate_as_interrupt
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.benchmark.tracking.client import Tracker
from metalr_bench.benchmark.tracking.liveness import mark_stale_runs
from metalr_bench.benchmark.tracking.retry import RetryPolicy
from metalr_bench.benchmark.training import export
from metalr_bench.benchmark.training.cell import CellResult, DataCache, train_cell
from metalr_bench.benchmark.training.cell import trainer_options as _trainer_options
from metalr_bench.benchmark.training.pretrain import starting_weights
from metalr_bench.benchmark.tuning.race import (
    STRATEGY_PARAM,
    Leader,
    RaceRunner,
    RaceTarget,
    arm_cell,
    leaders,
    race_targets,
    standings,
    trial_epochs,
)
from metalr_bench.benchmark.tuning.studies import open_storage, storage_url, tune_in_workers
from metalr_bench.reports.answer import ALPHA, dataset_answer
from metalr_bench.reports.stats import mean_ci
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: trials per strategy when ``--n-trials`` is not given (the grid spends ``tune.n_trials``,
#: 20 by default, on each)
TRIALS_PER_STRATEGY = 4
#: confirmation seeds when the config sets none
DEFAULT_SEEDS = [0, 1, 2, 3, 4]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class RaceError(ConfigError):
    """A race that cannot go on (bad settings, or no trial of a dataset completed)."""


@dataclass(frozen=True)
class RaceSettings:
    """What `run-benchmark race` adds to a config (flags, not config keys)."""

    n_trials: int | None = None  # per dataset; None: TRIALS_PER_STRATEGY per strategy
    top_k: int = 3
    min_epochs: int = 1  # Hyperband's smallest budget (epochs)
    register: str | None = None  # MLflow Model Registry name
    timings: StepTimings | None = None  # to price the full grid (else: the race's own s/iter)
    #: confirmation seeds; None: the config's when it sets them, else DEFAULT_SEEDS
    seeds: list[int] | None = None


def race_config(cfg: BenchmarkConfig, settings: RaceSettings) -> BenchmarkConfig:
    """``cfg`` as the race runs it: tuning on (its epochs, seed, metric, spaces), ``n_trials``
    trials in the one study, and 5 seeds unless the config (or ``--seeds``) sets them."""
    n = settings.n_trials or TRIALS_PER_STRATEGY * len(cfg.strategies)
    seeds = settings.seeds or (cfg.seeds if "seeds" in cfg.model_fields_set else DEFAULT_SEEDS)
    tune = cfg.tune.model_copy(update={"enabled": True, "n_trials": n, "pruner": "hyperband"})
    return cfg.model_copy(update={"tune": tune, "seeds": seeds})


def check_settings(cfg: BenchmarkConfig, s: RaceSettings) -> None:
    """Bad flags fail before anything runs, naming the flag, what it takes and what to do."""
    if len(cfg.strategies) < 2:
        names = ", ".join(x.name for x in cfg.strategies) or "none"
        raise RaceError(f"`strategies`: a race needs at least 2 strategies to choose between, "
                        f"got {len(cfg.strategies)} ({names}); name more with `--strategy`, or "
                        "tune and train one with `run-benchmark --tune --strategy NAME`")
    if s.n_trials is not None and s.n_trials < 1:
        raise RaceError(f"`--n-trials` {s.n_trials}: a race needs at least 1 trial; give e.g. "
                        f"{TRIALS_PER_STRATEGY * len(cfg.strategies)} ({TRIALS_PER_STRATEGY} per "
                        "strategy)")
    if s.top_k < 1:
        raise RaceError(f"`--top-k` {s.top_k}: confirm at least the best strategy (1 or more)")
    if s.min_epochs < 1:
        raise RaceError(f"`--min-epochs` {s.min_epochs}: Hyperband's smallest budget is at "
                        "least 1 epoch")
    epochs = cfg.tune.epochs or cfg.epochs
    if s.min_epochs > epochs:
        raise RaceError(f"`--min-epochs` {s.min_epochs} is more than a trial's {epochs} epoch(s) "
                        "(`tune.epochs`, else `epochs`); lower it or raise `--trial-epochs`")
    if s.register is not None:
        if not _NAME.match(s.register):
            raise RaceError(f"`--register` {s.register!r}: a model name of letters, digits, "
                            "`_`, `-` and `.` (at most 128), e.g. `--register pneumonia-pick`")
        uri = cfg.tracking_uri
        if "://" not in uri or uri.startswith("file:"):
            raise RaceError(f"`--register` needs the MLflow Model Registry, which a file store "
                            f"({uri}) does not have: use `--tracking-uri sqlite:///mlflow.db` or "
                            "a tracking server")


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
                     f", against {_duration(self.grid_s)} for the grid ({self.grid_s_how})")
        as_run = ""
        if self.grid_run_iters:
            word = "an estimated " if self.grid_run_estimated else "the "
            as_run = (f"{100 * self.share_run_iters:.1f} % of {word}{self.grid_run_iters:,} the "
                      f"full grid spends as it runs, with its pruning ({self.grid_run_how}), and ")
        return (f"The race spent {self.race_iters:,} training iterations ({self.search_iters:,} "
                f"searching, {self.confirm_iters:,} confirming), {as_run}"
                f"{100 * self.share_iters:.1f} % of the {self.grid_iters:,} that "
                f"`run-benchmark plan` counts for the full grid (every trial at its full "
                f"epochs: an upper bound), in {_duration(self.race_s)} "
                f"of wall time{grid_time}.")


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
    #: every named strategy's line (:func:`tuning.race.standings`)
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
        out += [f"{r.cell.dataset_key} {r.cell.strategy_label} seed={r.cell.seed}: {r.error}"
                for race in self.races for r in race.results if r.status != "FINISHED"]
        return out


def race_cell_call(cfg: BenchmarkConfig, tracker: Tracker, data: DataCache, cell: Cell,
                   parent_id: str) -> CellResult:
    """A confirmation cell as an executor's unit of work: the grid's cell, its selected
    checkpoint kept on disk (the winner's model)."""
    return run_cell(cfg, tracker, data, cell, parent_id, keep_weights=True)


# -- the whole race ---------------------------------------------------------------------------------
def run_race(cfg: BenchmarkConfig, settings: RaceSettings, *, progress: bool = True,
             announce: Callable[[BenchmarkConfig, list[RaceTarget]], None] | None = None,
             ) -> RaceOutcome:
    """Race every dataset of ``cfg`` under one parent run (see the module docstring)."""
    check_settings(cfg, settings)
    rcfg = race_config(cfg, settings)
    data = DataCache()
    preflight(rcfg, data)
    targets = race_targets(rcfg, data)  # every space resolved before any run exists
    if announce is not None:
        announce(rcfg, targets)
    executor = get_executor(rcfg)
    url = storage_url(rcfg)
    storage = open_storage(url)
    # Optuna's INFO line for the study and every trial: the bar says it, and --no-progress
    # asks for silence; warnings still print
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with executor.tracking(rcfg.tracking_uri) as uri:
        tracker = Tracker(uri, rcfg.name, retry=RetryPolicy(max_total_s=rcfg.tracking_retry_s),
                          fallback_dir=Path(rcfg.output_dir) / "unlogged-metrics")
        mark_stale_runs(tracker)
        races: list[DatasetRace] = []
        with terminate_as_interrupt(), tracker.run(
            f"{rcfg.name}-race", tags={T.KIND: T.KIND_RACE, T.TUNED: "true",
                                       "optuna.storage": url, **environment_tags()}
        ) as parent:
            tracker.log_dict(parent, rcfg.model_dump(mode="json"), "config.json")
            tracker.log_params(parent, {
                "n_trials": rcfg.tune.n_trials, "top_k": settings.top_k,
                "min_epochs": settings.min_epochs, "trial_epochs": rcfg.tune.epochs or rcfg.epochs,
                "epochs": rcfg.epochs, "seeds": rcfg.seeds, "model": rcfg.model.arch,
                "metric": rcfg.tune.metric, "register": settings.register or ""})
            for t in targets:
                races.append(_race_dataset(rcfg, cfg, settings, t, tracker, parent, storage, url,
                                           data, executor, uri, progress, len(targets)))
            summary = {"name": rcfg.name, "parent_run_id": parent,
                       "settings": {"n_trials": rcfg.tune.n_trials, "top_k": settings.top_k,
                                    "min_epochs": settings.min_epochs, "seeds": rcfg.seeds,
                                    "register": settings.register},
                       "datasets": [r.as_dict() for r in races]}
            tracker.log_dict(parent, summary, "race/summary.json")
            tracker.log_text(parent, format_race(races), "race/summary.txt")
            tracker.set_tags(parent, {f"race.winner.{_key(r.dataset)}": r.winner or "none"
                                      for r in races})
            # the report of this run (`run-benchmark report --parent-run-id`) marks its answers
            tracker.set_tags(parent, {T.RACE_COMPUTE: json.dumps(
                {r.dataset: r.compute.sentence() for r in races if r.compute is not None})})
        out = Path(rcfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{rcfg.name}-race.json"
        path.write_text(json.dumps(summary, indent=2, default=str))
        return RaceOutcome(parent, tracker.experiment_id, races, path)


def _race_dataset(rcfg: BenchmarkConfig, cfg: BenchmarkConfig, settings: RaceSettings,
                  t: RaceTarget, tracker: Tracker, parent: str, storage: Any, url: str,
                  data: DataCache, executor: Any, uri: str, progress: bool,
                  n_races: int) -> DatasetRace:
    label = t.dataset_key
    bundle = data.get(t.data_cell(rcfg.tune.seed))
    # the pretrain stage runs (once, cached) here, never in the search's workers
    weights, source = starting_weights(rcfg, bundle, tracker, parent, progress=progress,
                                       dataset=t.dataset)
    # 1. the search: in this process, or on the executor's workers sharing the study
    runner = RaceRunner(rcfg, t, tracker, storage, url, bundle, weights, source,
                        min_epochs=settings.min_epochs)
    workers = search_workers(rcfg, executor)
    with tqdm(total=rcfg.tune.n_trials, desc=f"race {label}", unit="trial",
              disable=not progress) as bar:
        if workers == 1:
            outcome = runner.run(parent, bar)
        else:
            outcome, = tune_in_workers(rcfg, [runner], parent, executor, uri, bar,
                                       workers=workers)
    # every named strategy to full resource (a trial each that Hyperband left short), serially
    topped = runner.top_up(parent)
    if topped is not None:
        outcome = topped
    study = optuna.load_study(study_name=t.name, storage=storage)
    board = leaders(study, rcfg.tune.metric, rcfg.tune.epochs or rcfg.epochs)
    race = DatasetRace(label, t.name, outcome.counts, board)
    race.strategies = standings(study, list(t.arms), board, [], settings.top_k)
    if not board:
        race.error = (f"no trial of race {t.name} completed ({outcome.counts}); see the trial "
                      f"runs under MLflow run {outcome.run_id}")
        log.error(race.error)
        return race
    # 2. the confirmation
    top = board[:settings.top_k]
    race.confirmed = [b.strategy for b in top]
    race.strategies = standings(study, list(t.arms), board, race.confirmed, settings.top_k)
    cells = [arm_cell(rcfg, t, b.values, seed) for b in top for seed in rcfg.seeds]
    if progress:
        tqdm.write(f"race {label}: confirming {', '.join(race.confirmed)} on "
                   f"{len(rcfg.seeds)} seed(s)")
    race.results = executor.map_cells(race_cell_call, rcfg, cells, parent, uri, tracker=tracker,
                                      data=data, progress=progress)
    # 3. what it spent, the answer, the winner
    race.compute = compute_spent(rcfg, cfg, t, study, race.results, tracker, settings.timings)
    _answer(rcfg, race)
    spent = {"train_iters": race.compute.race_iters, "grid_train_iters": race.compute.grid_iters,
             "share_iters": race.compute.share_iters, "wall_s": race.compute.race_s}
    if race.compute.grid_run_iters:
        spent |= {"grid_run_train_iters": race.compute.grid_run_iters,
                  "share_run_iters": race.compute.share_run_iters}
    if race.compute.grid_s is not None:
        spent["grid_s"] = race.compute.grid_s
    tracker.log_metrics(parent, {f"race.{_key(label)}.{k}": v for k, v in spent.items()})
    # 4. the model
    if race.winner is not None:
        race.model = log_winner_model(rcfg, race, bundle, weights, tracker, parent, uri,
                                      registered_name(settings.register, t, n_races))
    return race


def search_workers(rcfg: BenchmarkConfig, executor: Any) -> int:
    """How many workers share a race's study: one with the serial executor; else
    ``--workers-per-study`` when given, or the executor's workers (``--workers``): a race has
    one study per dataset, so the grid's default of one worker per study would leave the
    others idle."""
    if executor.name == "serial":
        return 1
    if "workers_per_study" in rcfg.tune.model_fields_set:
        return rcfg.tune.workers_per_study
    return max(1, rcfg.workers or executor.n_workers)


def _key(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", label)


def _metrics(rcfg: BenchmarkConfig) -> tuple[str, str, bool]:
    """(the answer's test metric, the validation metric that picks the winner, higher better)."""
    m = rcfg.tune.metric
    if m == "val_loss":
        return f"test_{rcfg.selection_metric}", "best_val_loss", False
    return f"test_{m}", f"best_val_{m}", True


def _answer(rcfg: BenchmarkConfig, race: DatasetRace) -> None:
    """The confirmation's table, the answer marked as a race, and the winner on validation."""
    metric, val_key, higher = _metrics(rcfg)
    rows = [{"dataset_key": race.dataset, "strategy": r.cell.strategy,
             "strategy_label": r.cell.strategy, "seed": r.cell.seed, "run_id": r.run_id,
             "config_hash": r.config_hash,
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


def compute_spent(rcfg: BenchmarkConfig, cfg: BenchmarkConfig, t: RaceTarget,
                  study: optuna.Study, results: list[CellResult], tracker: Tracker,
                  timings: StepTimings | None) -> Compute:
    """Training iterations as `run-benchmark plan` counts them, for the trials (the epochs each
    reported: pruned ones stop early) and the confirmation runs, next to the plan of the full
    grid of this dataset (every strategy tuned with the config's ``tune.n_trials``, then every
    seed); wall time measured (trials' and runs' start to end)."""
    sizes: dict[str, SplitSizes] = {}
    search = 0
    for strategy, epochs, _ in trial_epochs(study):
        if strategy not in t.arms or epochs == 0:
            continue
        cell = Cell(dataset=t.dataset, strategy=strategy, params=t.arms[strategy].fixed,
                    seed=rcfg.tune.seed)
        search += count_run(rcfg, cell, cached_sizes(sizes, t.dataset), epochs=epochs,
                            evaluate_test=False).train_steps
    confirm = sum(count_run(rcfg, r.cell, cached_sizes(sizes, t.dataset), epochs=rcfg.epochs,
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
        "datasets": [t.dataset], "seeds": rcfg.seeds,
        "tune": cfg.tune.model_copy(update={"enabled": True})})
    rows = plan_rows(grid_cfg, timings, sizes)
    grid_iters = sum(r.train_steps for r in rows)
    run_iters, run_how, estimated = grid_as_run(grid_cfg, t, study, tracker, sizes, rows)
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


def grid_as_run(grid_cfg: BenchmarkConfig, t: RaceTarget, study: optuna.Study,
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
        if s not in t.arms or tr.user_attrs.get("race.top_up") or not tr.intermediate_values:
            continue
        cell = Cell(dataset=t.dataset, strategy=s, params=t.arms[s].fixed, seed=grid_cfg.tune.seed)
        one = count_run(grid_cfg, cell, cached_sizes(sizes, t.dataset), epochs=1,
                        evaluate_test=False).train_steps
        spent += one * len(tr.intermediate_values)
        at_full += one * full
    rate = spent / at_full if at_full else None
    total, measured, n_runs = final, [], 0
    for s, arm in t.arms.items():
        name = arm.name.replace("'", "\\'")
        runs = tracker.search_runs(f"tags.{T.KIND} = '{T.KIND_TRIAL}' and "
                                   f"tags.`{T.STUDY_NAME}` = '{name}'")
        epochs = [len(tracker.client.get_metric_history(r.info.run_id, "train_loss"))
                  for r in runs]
        epochs = [e for e in epochs if e > 0]
        if epochs:
            cell = Cell(dataset=t.dataset, strategy=s, params=arm.fixed, seed=grid_cfg.tune.seed)
            one = count_run(grid_cfg, cell, cached_sizes(sizes, t.dataset), epochs=1,
                            evaluate_test=False).train_steps
            total += round(n_trials * one * sum(epochs) / len(epochs))
            measured.append(s)
            n_runs += len(epochs)
        elif rate is not None:
            total += round(tuning.get(s, 0) * rate)
        else:
            return None, "", True
    if len(measured) == len(t.arms):
        return total, (f"measured: the grid's {n_runs} trial runs in this experiment, at the "
                       f"epochs they trained, scaled to {n_trials} trials per strategy"), False
    how = (f"estimated at the race's own pruning rate, its trials trained "
           f"{100 * (rate or 0):.0f} % of their epochs")
    if measured:
        how += f"; measured for {', '.join(measured)} from the grid's {n_runs} trial runs"
    return total, how, True


# -- the model --------------------------------------------------------------------------------------
def log_winner_model(rcfg: BenchmarkConfig, race: DatasetRace, bundle: Any, weights: Any,
                     tracker: Tracker, parent: str, uri: str, register: str | None,
                     ) -> dict[str, Any]:
    """The winner's selected checkpoint as an MLflow model in a ``kind=model`` run under the
    race's run; registered as ``register`` (tag ``race_parent_run_id``) when given."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    winner = next(r for r in race.results if r.run_id == race.winner_run_id)
    eff = rcfg.effective(winner.cell)
    normalize = _trainer_options(eff, seed=winner.cell.seed, epochs=1).normalize
    state = export.load_selected(rcfg.output_dir, winner.config_hash)
    retrained = state is None
    if retrained:  # a run FINISHED before without keeping it (e.g. by the plain grid): the same
        # cell trained again in this process, its checkpoint chosen on validation as always
        log.warning("race %s: the selected weights of run %s are not on disk; training the "
                    "winner's cell again for its model", race.dataset, winner.run_id)
        result = train_cell(rcfg, winner.cell, bundle, weights, [], artifacts=False)
        state = result.final_state
    assert state is not None
    model = export.serving_model(eff.model.arch, bundle, state, normalize)
    images, labels = export.split_inputs(bundle)
    metrics = export.evaluate(model, images, labels, bundle.task)
    pre = export.preprocessing(bundle, normalize)
    pre |= {"dataset": race.dataset, "strategy": winner.cell.strategy,
            "params": winner.cell.params, "overrides": winner.cell.overrides,
            "seed": winner.cell.seed, "model": eff.model.arch,
            "source_run_id": winner.run_id, "race_parent_run_id": parent}
    example = images[:2]
    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, out)
    tags = {T.KIND: T.KIND_MODEL, T.DATASET: race.dataset, T.STRATEGY: winner.cell.strategy,
            T.SEED: winner.cell.seed, T.MODEL: eff.model.arch, "source_run_id": winner.run_id,
            T.STUDY_NAME: race.study_name, "retrained": str(retrained).lower()}
    info: dict[str, Any] = {"retrained": retrained, "test_metrics": metrics}
    with tracker.run(f"{race.dataset}/{winner.cell.strategy}/model", tags,
                     parent_id=parent) as run_id:
        tracker.log_metrics(run_id, {f"test_{k}": v for k, v in metrics.items()})
        tracker.log_dict(run_id, pre, "preprocessing.json")
        before = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            with mlflow.start_run(run_id=run_id, experiment_id=tracker.experiment_id):
                logged = mlflow.pytorch.log_model(
                    model, name="model", signature=signature, input_example=example,
                    metadata={"preprocessing": pre}, pip_requirements=_requirements())
            info |= {"run_id": run_id, "model_uri": logged.model_uri,
                     "runs_uri": f"runs:/{run_id}/model"}
            if register:
                version = mlflow.register_model(logged.model_uri, register,
                                                tags={"race_parent_run_id": parent,
                                                      "dataset": race.dataset,
                                                      "strategy": winner.cell.strategy})
                info |= {"registered_name": register, "version": int(version.version),
                         "registry_uri": f"models:/{register}/{version.version}"}
                # what the version is, on its page in the UI (it used to be empty)
                mlflow.MlflowClient(uri).update_model_version(
                    register, version.version, description=model_description(
                        rcfg, race, winner.cell, metrics, info["registry_uri"], parent))
                tracker.set_tags(run_id, {"registered_model": f"{register}/{version.version}"})
        finally:
            mlflow.set_tracking_uri(before)
    return info


def model_description(rcfg: BenchmarkConfig, race: DatasetRace, cell: Cell,
                      metrics: dict[str, float], registry_uri: str, parent: str) -> str:
    """The registered version's description (Markdown, shown on its page in the MLflow UI):
    the dataset, the strategy and its parameters, how it was chosen, its test metric with the
    confirmation's 95 % interval over seeds, and how to load it."""
    metric, val_key, higher = _metrics(rcfg)
    name = metric.removeprefix("test_")
    params = ", ".join(f"{k}={v}" for k, v in sorted(cell.params.items())) or "defaults"
    trials = sum(race.counts.values()) if race.counts else 0
    lines = [
        f"**{cell.strategy}** ({params}) fine-tuning **{rcfg.model.arch}** on "
        f"**{race.dataset}**, seed {cell.seed}.",
        "",
        f"How it was chosen: `run-benchmark race` (run {parent}) searched "
        f"{len(rcfg.strategies)} strategies in one Optuna study "
        f"({trials} trials, Hyperband-pruned on validation {rcfg.tune.metric}), confirmed the "
        f"top {len(race.confirmed)} ({', '.join(race.confirmed)}) on {len(rcfg.seeds)} seeds, "
        f"and kept the strategy with the {'highest' if higher else 'lowest'} mean validation "
        f"{val_key.removeprefix('best_val_')} and its seed with the best validation value. "
        "Test data played no part in the choice.",
        "",
    ]
    row = (race.table[race.table["strategy"] == cell.strategy]
           if not race.table.empty else race.table)
    if name in metrics:
        lines.append(f"Test {name} of this model: {metrics[name]:.3f}.")
    if not row.empty and f"{metric}_mean" in row:
        r = row.iloc[0]
        lines.append(f"Confirmation ({int(r['n_seeds'])} seeds): test {name} "
                     f"{r[f'{metric}_mean']:.3f}, 95 % CI [{r['ci_low']:.3f}, "
                     f"{r['ci_high']:.3f}] (t interval over seeds).")
    if race.tied:
        lines.append(f"Tied with the best on test: {', '.join(race.tied)}.")
    lines += [
        "",
        f"Load it: `mlflow.pytorch.load_model(\"{registry_uri}\")`; input float32 "
        f"(N, C, H, W) at the training image size, pixels scaled to [0, 1] (the normalisation "
        "is inside the model); output probabilities per class (see `preprocessing.json` and "
        "the model's metadata). Needs `metalr_bench` installed.",
    ]
    return "\n".join(lines)


def _requirements() -> list[str]:
    """Pinned torch (skips MLflow's slow inference of requirements); the model's classes come
    from this suite (``metalr_bench``), installed where it is loaded."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}"]


# -- what the user reads ----------------------------------------------------------------------------
def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def registered_name(register: str | None, target: RaceTarget, n_races: int) -> str | None:
    """``--register NAME``: NAME for a race of one dataset; ``NAME-<dataset>`` per dataset
    when the config races several (one model per dataset)."""
    if register is None or n_races == 1:
        return register
    return f"{register}-{target.dataset.dataset_name}"


def format_race(races: list[DatasetRace]) -> str:
    """The printed summary: per dataset the search, the confirmation table, the answer, the
    winner's model and the compute."""
    out: list[str] = []
    for r in races:
        c = r.counts
        out.append(f"Race {r.dataset}: {sum(c.values())} trial(s) (complete "
                   f"{c.get('complete', 0)}, pruned {c.get('pruned', 0)}, failed "
                   f"{c.get('fail', 0)}), study {r.study_name}")
        if r.strategies:
            rung = next((row["rung"] for row in r.strategies if "rung" in row), None)
            out.append("  search, every strategy named"
                       + (f" (its best validation value within {rung} epoch(s), the rung "
                          "every strategy reached)" if rung else "") + ":")
            out.append(f"  {'strategy':16s} {'trials':>6s} {'done/pruned/failed':>18s} "
                       f"{'epochs':>6s} {'value':>7s}  what the race did")
            for row in r.strategies:
                value = f"{row['value']:.4f}" if "value" in row else "-"
                done = f"{row['complete']}/{row['pruned']}/{row['failed']}"
                out.append(f"  {row['strategy']:16s} {row['trials']:6d} {done:>18s} "
                           f"{row['epochs']:6d} {value:>7s}  {row['status']}")
        if r.error:
            out.append(f"  FAILED: {r.error}")
            continue
        if not r.table.empty:
            metric = next(k for k in r.table.columns if k.startswith("test_") and
                          k.endswith("_mean"))[:-5]
            val = next(k for k in r.table.columns if k.startswith("best_val_"))[:-5]
            out.append(f"  {'strategy':16s} {'search best':>11s} {metric + ' (mean ± std)':>24s} "
                       f"{val:>14s} {'vs best (Holm p)':>18s}")
            for _, row in r.table.iterrows():
                sd = row[f"{metric}_std"]
                score = f"{row[f'{metric}_mean']:.3f}" + ("" if math.isnan(sd) else f" ± {sd:.3f}")
                p = row.get("p_holm", math.nan)
                vs = ("best" if row["strategy"] == r.best_on_test else
                      f"{row.get('diff_vs_best', math.nan):+.3f} (p {p:.2g})"
                      if isinstance(p, float) and not math.isnan(p) else "no test")
                out.append(f"  {row['strategy']:16s} {row['search_best']:11.4f} "
                           f"{score + f' ({int(row.n_seeds)})':>24s} "
                           f"{row[f'{val}_mean']:14.4f} {vs:>18s}")
        out.append("  " + " ".join(r.answer))
        if r.winner:
            line = (f"  Model: {r.winner} (chosen on validation), seed {r.winner_seed}, "
                    f"run {r.winner_run_id}")
            if r.model.get("registry_uri"):
                line += (f"; registered as {r.model['registry_uri']} (load it with "
                         f"mlflow.pytorch.load_model(\"{r.model['registry_uri']}\"))")
            elif r.model.get("runs_uri"):
                line += f"; logged as {r.model['runs_uri']}"
            out.append(line)
        out.append("")
    return "\n".join(out).rstrip()
