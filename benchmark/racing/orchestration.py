"""`run-benchmark race`: which strategy for a new dataset, at a fraction of the full grid.

A researcher with a new dataset does not want to pay for the full grid (every strategy × its
trials × 5 seeds) to learn which strategy to use. Per dataset, the race

1. **searches**: one Optuna study whose first choice is the strategy, then that strategy's own
   (grid) search space, Hyperband-pruned on the per-epoch validation metric
   (:mod:`metalr_bench.benchmark.tuning.race_study`); trials are MLflow child runs of the study's run,
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
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from metalr_bench.benchmark.config import BenchmarkConfig, Cell
from metalr_bench.benchmark.racing.formatting import format_race
from metalr_bench.benchmark.racing.outcome import (
    DatasetRace,
    RaceOutcome,
    answer_race,
    compute_spent,
)
from metalr_bench.benchmark.racing.settings import RaceSettings, check_settings, race_config
from metalr_bench.benchmark.racing.winner_model import log_winner_model, registered_name
from metalr_bench.benchmark.running.executors import get_executor
from metalr_bench.benchmark.running.preflight import preflight
from metalr_bench.benchmark.running.runner import environment_tags, run_cell
from metalr_bench.benchmark.running.signals import terminate_as_interrupt
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.benchmark.tracking.client import Tracker
from metalr_bench.benchmark.tracking.liveness import mark_stale_runs
from metalr_bench.benchmark.tracking.retry import RetryPolicy
from metalr_bench.benchmark.training.cell import CellResult, DataCache
from metalr_bench.benchmark.training.pretrain import starting_weights
from metalr_bench.benchmark.tuning.race_study import (
    RaceRunner,
    RaceSpec,
    arm_cell,
    leaders,
    race_specs,
    standings,
)
from metalr_bench.benchmark.tuning.studies import open_storage, storage_url, tune_in_workers
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def race_cell_call(cfg: BenchmarkConfig, tracker: Tracker, data: DataCache, cell: Cell,
                   parent_id: str) -> CellResult:
    """A confirmation cell as an executor's unit of work: the grid's cell, its selected
    checkpoint kept on disk (the winner's model)."""
    return run_cell(cfg, tracker, data, cell, parent_id, keep_weights=True)


# -- the whole race ---------------------------------------------------------------------------------
def run_race(cfg: BenchmarkConfig, settings: RaceSettings, *, progress: bool = True,
             announce: Callable[[BenchmarkConfig, list[RaceSpec]], None] | None = None,
             ) -> RaceOutcome:
    """Race every dataset of ``cfg`` under one parent run (see the module docstring)."""
    check_settings(cfg, settings)
    rcfg = race_config(cfg, settings)
    data = DataCache()
    preflight(rcfg, data)
    specs = race_specs(rcfg, data)  # every space resolved before any run exists
    if announce is not None:
        announce(rcfg, specs)
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
            for spec in specs:
                races.append(_race_dataset(rcfg, cfg, settings, spec, tracker, parent, storage, url,
                                           data, executor, uri, progress, len(specs)))
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
                  spec: RaceSpec, tracker: Tracker, parent: str, storage: Any, url: str,
                  data: DataCache, executor: Any, uri: str, progress: bool,
                  n_races: int) -> DatasetRace:
    label = spec.dataset.dataset_key
    bundle = data.get(spec.data_cell(rcfg.tune.seed))
    # the pretrain stage runs (once, cached) here, never in the search's workers
    weights, source = starting_weights(rcfg, bundle, tracker, parent, progress=progress,
                                       dataset=spec.dataset)
    # 1. the search: in this process, or on the executor's workers sharing the study
    runner = RaceRunner(rcfg, spec, tracker, storage, url, bundle, weights, source,
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
    study = optuna.load_study(study_name=spec.name, storage=storage)
    board = leaders(study, rcfg.tune.metric, rcfg.tune.epochs or rcfg.epochs)
    race = DatasetRace(label, spec.name, outcome.counts, board)
    race.strategies = standings(study, list(spec.arms), board, [], settings.top_k)
    if not board:
        race.error = (f"no trial of race {spec.name} completed ({outcome.counts}); see the trial "
                      f"runs under MLflow run {outcome.run_id}")
        log.error(race.error)
        return race
    # 2. the confirmation
    top = board[:settings.top_k]
    race.confirmed = [b.strategy for b in top]
    race.strategies = standings(study, list(spec.arms), board, race.confirmed, settings.top_k)
    cells = [arm_cell(rcfg, spec, b.values, seed) for b in top for seed in rcfg.seeds]
    if progress:
        tqdm.write(f"race {label}: confirming {', '.join(race.confirmed)} on "
                   f"{len(rcfg.seeds)} seed(s)")
    race.results = executor.map_cells(race_cell_call, rcfg, cells, parent, uri, tracker=tracker,
                                      data=data, progress=progress)
    # 3. what it spent, the answer, the winner
    race.compute = compute_spent(rcfg, cfg, spec, study, race.results, tracker, settings.timings)
    answer_race(rcfg, race)
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
                                      registered_name(settings.register, spec, n_races))
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


