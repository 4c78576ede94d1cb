"""Fair tuning: one Optuna study per (dataset, strategy) on validation data, then the final grid.

Why: a strategy that happens to like the default LR would win an untuned comparison. Every
strategy here gets the same budget -- the same number of trials, epochs and training seed --
over its own key knobs (:mod:`metalr_bench.benchmark.tuning.space`), judged by the same
validation metric. The test split is never loaded while tuning (``evaluate_test=False``); the
final grid then trains each strategy with its best parameters on every seed and reports test
metrics like an untuned benchmark does.

Storage and resume: studies live in an Optuna storage (SQLite ``optuna.db`` next to the MLflow
DB by default), named from everything that defines the objective, and are opened with
``load_if_exists``: re-running the same config continues the same study and runs only the
trials still missing. ``optuna-dashboard <storage>`` browses them.

Where trials run: in this process (serial executor), or as calls of the ``local``/``ray``
executor (:func:`study_worker`), ``tune.workers_per_study`` workers per study, sharing a
journal file (default) or a database; both through :func:`study_storage.fill_study`.

MLflow layout (written by hand with MlflowClient: Optuna's MLflowCallback is deprecated and
uses the fluent API's global active run)::

    benchmark parent run (kind=benchmark, tuned=true)
    ├── study run per (dataset, strategy)  kind=study, optuna.study_name, optuna.storage,
    │   │                                  best.<param> (tags + metrics), best_value
    │   └── trial run per trial            kind=trial, optuna.trial_number, optuna.state,
    │                                      params, per-epoch metrics, objective
    └── final cell runs                    tuned=true, optuna.study_name, the tuned params

A control runs at the parameters of the strategy it controls: with ``metalr`` and
``discriminative`` in one tuned grid (``Strategy.controls``), ``discriminative`` gets no study;
each of its cells takes metalr's best parameters less the hyper-gradient (:func:`control_cells`:
the same lr and overrides, backbone_lr_scale, head pin and optimizer) and is logged with
``tuned_from=metalr`` (param and tag) and metalr's study name. Two separate studies would end at
two different learning rates, and "metalr − discriminative" would then measure the learning
rate as much as the hyper-gradient. Alone in a grid, ``discriminative`` keeps its own study.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import optuna
from metalr_bench.benchmark.config import (
    BenchmarkConfig,
    Cell,
    ConfigError,
    DatasetSpec,
    TuneSpec,
    stable_hash,
    tuned_controls,
)
from metalr_bench.benchmark.models.zoo import build_model
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.benchmark.tracking.client import MetricsLogger, Tracker
from metalr_bench.benchmark.training.cell import CellResult, strategy_tags, train_cell
from metalr_bench.benchmark.training.pretrain import starting_weights
from metalr_bench.benchmark.training.trainer import TrainerCallback
from metalr_bench.benchmark.tuning import stale_trials
from metalr_bench.benchmark.tuning import storage as study_storage
from metalr_bench.benchmark.tuning.space import SearchDim, search_space, split_params, suggest
from metalr_bench.strategies.core.layers import layer_groups
from metalr_bench.strategies.core.registry import get_strategy
from optuna.trial import TrialState
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

FINISHED_STATES = study_storage.FINISHED_STATES
#: how trials report their steps (:class:`PruningReporter`); part of every study's name
REPORT_STEPS = "epoch-1-based"


# -- settings -> Optuna objects ---------------------------------------------------------------
def direction(metric: str) -> str:
    return "minimize" if metric == "val_loss" else "maximize"


def metric_key(metric: str) -> str:
    """The per-epoch record key the objective reads (``val_auc``, ..., ``val_loss``)."""
    return metric if metric == "val_loss" else f"val_{metric}"


def storage_url(cfg: BenchmarkConfig) -> str:
    """Where the studies live: ``tune.storage``, else a file next to the MLflow DB.

    Serial tuning uses SQLite ``optuna.db``; with ``executor: local|ray`` several processes
    write at once, so the default is a JournalStorage file ``optuna-journal.log`` (Optuna's
    recommended storage for parallel workers without a database server). A tracking server
    (no local SQLite file) puts the file in ``output_dir``.
    """
    if cfg.tune.storage is not None:
        return cfg.tune.storage
    uri = cfg.tracking_uri
    if urlparse(uri).scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).expanduser().resolve().parent
    else:
        folder = Path(cfg.output_dir).expanduser().resolve()
    if cfg.executor != "serial":
        return str(folder / "optuna-journal.log")
    return f"sqlite:///{folder / 'optuna.db'}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage for a URL, a JournalStorage for a ``.log``/``.jsonl`` file path."""
    try:
        return study_storage.open_storage(url)
    except study_storage.StorageError as exc:
        raise ConfigError(f"`tune.storage`: {exc}") from None


def make_sampler(tune: TuneSpec) -> optuna.samplers.BaseSampler:
    if tune.sampler == "gp":
        return optuna.samplers.GPSampler(seed=tune.seed)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tune.seed)
    return optuna.samplers.TPESampler(seed=tune.seed)


def make_pruner(tune: TuneSpec, epochs: int) -> optuna.pruners.BasePruner:
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if tune.pruner == "none":
        return optuna.pruners.NopPruner()
    # steps are 1-based epochs (:class:`PruningReporter`): with ``n_warmup_steps=0`` and
    # ``interval_steps=1`` a trial may be pruned after its first epoch, as documented
    return optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup_trials,
                                       n_warmup_steps=0, interval_steps=1)


# -- what is tuned ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudySpec:
    """One study: a dataset, a strategy, its fixed (untuned) params and its search space.

    A tuning unit is a *spec* (this, and the race's :class:`~.race_study.RaceSpec`); it was
    called a "target" before issue 40, which is the word for the dataset being fine-tuned."""

    dataset: DatasetSpec
    strategy: str
    fixed: dict[str, Any]
    space: dict[str, SearchDim]
    name: str

    def data_cell(self, seed: int) -> Cell:
        """The cell whose data (and starting weights) the study's trials train on."""
        return Cell(dataset=self.dataset, strategy=self.strategy, params=self.fixed, seed=seed)


def study_name(
    cfg: BenchmarkConfig, dataset: DatasetSpec, strategy: str, fixed: dict[str, Any],
    space: dict[str, SearchDim],
) -> str:
    """``<benchmark>-<dataset>@<size>-<strategy>-<hash>``; the hash covers what defines the
    objective: the cell identity of a trial (:meth:`BenchmarkConfig.cell_identity`, at the
    tuning epochs and seed, without the searched names), the space and the tuning metric. So
    re-running the same config continues the same study and any change starts a new one.
    ``n_trials``, ``timeout``, sampler and pruner are left out: raising ``n_trials`` extends it.
    """
    trial_cfg = cfg.model_copy(update={"epochs": cfg.tune.epochs or cfg.epochs})
    trial = Cell(dataset=dataset, strategy=strategy, params=fixed, seed=cfg.tune.seed)
    payload = {
        "trial": trial_cfg.cell_identity(trial, tuned=space),
        "space": {k: asdict(v) for k, v in sorted(space.items())},
        "metric": cfg.tune.metric,
        # the pruners' steps are 1-based epochs since issue 38: a study whose trials reported
        # 0-based epochs is not continued (its median/Hyperband rungs would mix two scales)
        "steps": REPORT_STEPS,
    }
    return (f"{cfg.name}-{dataset.dataset_name}@{dataset.size}-{strategy}-"
            f"{stable_hash(payload)[:8]}")


def study_specs(cfg: BenchmarkConfig, data: Any) -> list[StudySpec]:
    """Validate the whole tuning plan before any training: one spec per (dataset, strategy)."""
    names = [s.name for s in cfg.strategies]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"`strategies`: {dupes} listed twice; with tuning each strategy is one "
                          "study, list it once")
    unknown = sorted(set(cfg.tune.params) - set(names))
    if unknown:
        raise ConfigError(f"`tune.params`: {unknown} are not in `strategies` ({', '.join(names)})")
    specs = []
    for d in cfg.dataset_specs():  # a cross-validation fold is tuned on its own validation data
        bundle = data.get(Cell(dataset=d, strategy=names[0], params={}, seed=cfg.tune.seed))
        model = build_model(cfg.model.arch, bundle.in_channels, bundle.num_outputs, d.size)
        n_groups = len(layer_groups(model))
        for s in cfg.strategies:
            space = search_space(s.name, n_groups, cfg.tune.params, {"lr": cfg.lr, **s.params})
            fixed = {k: v for k, v in s.params.items() if k not in space}
            ignored = sorted(set(s.params) - set(fixed))
            if ignored:
                log.warning("strategy %s: %s are tuned, the config's values are ignored",
                            s.name, ignored)
            listed = [k for k, v in fixed.items() if isinstance(v, list)]
            if listed:
                raise ConfigError(
                    f"`strategies.{s.name}.params`: {listed} list several values, but a tuned "
                    "strategy is one study; give one value or tune them via `tune.params`"
                )
            name = study_name(cfg, d, s.name, fixed, space)
            specs.append(StudySpec(d, s.name, fixed, space, name))
    return specs


def objective_value(values: list[float], end_val: dict[str, float] | None, metric: str) -> float:
    """The trial's value: the validation score of the model the row reports. That is the best
    epoch's (:func:`best_of`), except where the strategy changed the selected checkpoint at the
    end of training and measured it again (``TrainResult.end_val``; WiSE-FT's θ(α*), the
    interpolated model at its chosen α): then that model's score, so its lr is tuned for the
    model it reports, not for the fine-tuned endpoint. The pruner still sees the per-epoch
    scores of the endpoint (a trial cannot be interpolated before it ends)."""
    if end_val is not None:
        value = float(end_val.get(metric_key(metric).removeprefix("val_"), math.nan))
        if not math.isnan(value):
            return value
    return best_of(values, metric)


# -- the objective --------------------------------------------------------------------------------
class PruningReporter(TrainerCallback):
    """Report the epoch's validation metric to the trial; raise TrialPruned when told to.

    The step is the epoch counted from 1 (the trainer's ``epoch`` is 0-based): Hyperband's
    resources and the pruners' steps are then epochs trained, so ``HyperbandPruner(
    min_resource=1)`` has its first rung after exactly one epoch (reported 0-based, it fired
    after two and the last bracket never pruned).
    """

    def __init__(self, trial: optuna.Trial, key: str) -> None:
        self.trial = trial
        self.key = key
        self.values: list[float] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        value = float(metrics.get(self.key, math.nan))
        self.values.append(value)
        self.trial.report(value, epoch + 1)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} ({self.key}={value:.4f})")


def best_of(values: list[float], metric: str) -> float:
    """The objective: the best per-epoch validation value (the checkpoint the trainer keeps);
    :func:`objective_value` replaces it when the strategy changed that checkpoint at the end."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        raise ValueError(f"validation {metric} is NaN in every epoch (one class in val?)")
    return min(finite) if direction(metric) == "minimize" else max(finite)


@dataclass
class StudyOutcome:
    spec: StudySpec
    run_id: str
    best_params: dict[str, Any] | None
    best_value: float | None
    counts: dict[str, int] = field(default_factory=dict)


class StudyRunner:
    """Runs one study: recovery of interrupted trials, the trials, and their MLflow runs."""

    def __init__(self, cfg: BenchmarkConfig, spec: StudySpec, tracker: Tracker,
                 storage: optuna.storages.BaseStorage, storage_label: str, bundle: Any,
                 weights: Any, weights_source: str) -> None:
        self.cfg, self.spec, self.tracker = cfg, spec, tracker
        self.storage, self.storage_label = storage, storage_label
        self.bundle, self.weights, self.weights_source = bundle, weights, weights_source
        self.epochs = cfg.tune.epochs or cfg.epochs
        self.study_run_id = ""

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        """The study's sampler, seeded with ``seed`` (each parallel worker has its own)."""
        return make_sampler(self.cfg.tune.model_copy(update={"seed": seed}))

    def pruner(self) -> optuna.pruners.BasePruner:
        return make_pruner(self.cfg.tune, self.epochs)

    def create_study(self) -> optuna.Study:
        return optuna.create_study(
            storage=self.storage, study_name=self.spec.name, load_if_exists=True,
            direction=direction(self.cfg.tune.metric), sampler=self.sampler(self.cfg.tune.seed),
            pruner=self.pruner(),
        )

    def load_study(self, worker_index: int) -> optuna.Study:
        """The (existing) study as parallel worker ``worker_index`` opens it: the study's
        pruner, and a sampler seeded apart from the other workers' (``tune.seed + 1000·i``),
        so that two workers do not propose the same parameters."""
        return optuna.load_study(study_name=self.spec.name, storage=self.storage,
                                 sampler=self.sampler(self.cfg.tune.seed + 1000 * worker_index),
                                 pruner=self.pruner())

    def worker_settings(self) -> dict[str, Any]:
        """Keyword arguments a worker process passes to this runner's class to build its twin
        (:func:`study_worker`); a subclass adds its own."""
        return {}

    def recover_interrupted(self, study: optuna.Study) -> int:
        """Mark trials left RUNNING by a dead worker as FAIL (and their MLflow runs KILLED).

        Why by hand: Optuna's ``fail_stale_trials`` needs heartbeats, which only RDB storages
        have; :mod:`stale_trials` tells dead trials from live ones on any storage (a live trial
        may belong to another driver on another host). The driver calls this before any of its
        workers starts. A FAIL does not count towards ``n_trials``, so the trial is run again.
        """
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        stale = [(t, r) for t in running if (r := stale_trials.stale_reason(t)) is not None]
        for t, reason in stale:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id:
                self.tracker.set_tags(run_id, {"optuna.state": "FAIL",
                                               T.FAILURE_REASON: f"interrupted: {reason}",
                                               T.ERROR: f"interrupted: {reason}"})
                self.tracker.end_run(run_id, "KILLED")
            log.warning("study %s: trial %d was left RUNNING (%s); marked FAIL",
                        study.study_name, t.number, reason)
        if len(running) > len(stale):
            log.warning("study %s: %d trial(s) RUNNING in other live processes are left alone",
                        study.study_name, len(running) - len(stale))
        return len(stale)

    def objective(self, trial: optuna.Trial) -> float:
        spec, cfg = self.spec, self.cfg
        params, overrides = suggest(trial, spec.space)
        cell = Cell(dataset=spec.dataset, strategy=spec.strategy, params={**spec.fixed, **params},
                    seed=cfg.tune.seed, overrides=overrides)
        return self.train_trial(trial, cell)

    def train_trial(self, trial: optuna.Trial, cell: Cell) -> float:
        """Train ``cell`` as ``trial`` in its MLflow trial run; the objective's value. (The
        race's study, :mod:`.race_study`, samples the strategy first and trains through here too.)"""
        spec, cfg = self.spec, self.cfg
        worker = stale_trials.worker_id()
        tags = {T.KIND: T.KIND_TRIAL, T.STUDY_NAME: spec.name, "optuna.trial_number": trial.number,
                "optuna.state": "RUNNING", T.DATASET: spec.dataset.dataset_name,
                T.IMAGE_SIZE: spec.dataset.size, T.STRATEGY: cell.strategy, T.SEED: cfg.tune.seed,
                T.MODEL: cfg.model.arch, "worker": worker}
        eff = cfg.effective(cell).model_copy(update={"epochs": self.epochs})
        with self.tracker.run(f"{cell.strategy} trial {trial.number}", tags,
                              parent_id=self.study_run_id,
                              beat=lambda run_id: stale_trials.beat(trial, self.tracker, run_id),
                              finished_on=(optuna.TrialPruned,)) as run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("worker", worker)
            self.tracker.log_params(run_id, {
                **eff.cell_params(cell), "weights_source": self.weights_source,
                **{f"trial.{k}": v for k, v in trial.params.items()}})
            logger = MetricsLogger(self.tracker, run_id)
            reporter = PruningReporter(trial, metric_key(cfg.tune.metric))
            try:
                result = train_cell(cfg, cell, self.bundle, self.weights, [logger, reporter],
                                    epochs=self.epochs, evaluate_test=False, artifacts=False)
                value = objective_value(reporter.values, result.end_val, cfg.tune.metric)
            except optuna.TrialPruned:
                logger.flush()
                self.tracker.set_tags(run_id, {"optuna.state": "PRUNED"})
                raise
            except BaseException:
                self.tracker.set_tags(run_id, {"optuna.state": "FAIL"})
                raise
            # one request for the trial's closing params, tags and metrics (was four)
            summary = {k: v for k, v in result.summary().items() if not k.startswith("test_")}
            self.tracker.log_batch(run_id, params=result.data_params(),
                                   tags={**strategy_tags(cell.strategy),
                                         "optuna.state": "COMPLETE"},
                                   metrics={**summary, "objective": value}, step=self.epochs)
        return value

    # -- the study's own MLflow run ---------------------------------------------------------------
    def _find_study_run(self) -> str | None:
        name = self.spec.name.replace("'", "\\'")
        runs = self.tracker.search_runs(
            f"tags.{T.KIND} = '{T.KIND_STUDY}' and tags.`{T.STUDY_NAME}` = '{name}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    @contextmanager
    def study_run(self, parent_id: str) -> Iterator[str]:
        """The study's MLflow run: reused (and moved under ``parent_id``) when resuming."""
        spec, cfg = self.spec, self.cfg
        tags = {T.KIND: T.KIND_STUDY, T.STUDY_NAME: spec.name, "optuna.storage": self.storage_label,
                "optuna.direction": direction(cfg.tune.metric),
                T.DATASET: spec.dataset.dataset_name,
                T.IMAGE_SIZE: spec.dataset.size, T.STRATEGY: spec.strategy, T.MODEL: cfg.model.arch,
                "n_trials": cfg.tune.n_trials, "sampler": cfg.tune.sampler,
                "pruner": cfg.tune.pruner}
        reopen = self._find_study_run()
        with self.tracker.run(f"{spec.dataset.dataset_key}/{spec.strategy}/study", tags,
                              parent_id=parent_id, reopen=reopen) as run_id:
            self.tracker.log_params(run_id, {
                "metric": cfg.tune.metric, "tune_epochs": self.epochs,
                "tune_seed": cfg.tune.seed, "weights_source": self.weights_source,
                **{f"space.{k}": v.describe() for k, v in spec.space.items()},
                **{f"strategy.{k}": v for k, v in spec.fixed.items()},
            })
            self.study_run_id = run_id
            yield run_id

    def run(self, parent_id: str, bar: Any = None) -> StudyOutcome:
        """The whole study in this process (serial executor)."""
        cfg = self.cfg
        study = self.create_study()
        with self.study_run(parent_id) as run_id:
            self.recover_interrupted(study)
            done = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
            if bar is not None:
                bar.update(min(done, cfg.tune.n_trials))

            def on_trial(trial: optuna.trial.FrozenTrial) -> None:
                if bar is not None:
                    bar.update(trial.state in FINISHED_STATES)
                    best = _best(study)
                    bar.set_postfix_str(f"{self.spec.strategy} trial {trial.number} "
                                        f"{trial.state.name}"
                                        + (f" best={best.value:.4f}" if best else ""))

            # the same exact loop as parallel workers: a trial RUNNING in another live driver
            # counts towards n_trials, so two drivers on one study do not overshoot it
            study_storage.fill_study(study, self.objective, n_trials=cfg.tune.n_trials,
                                     url=self.storage_label, timeout=cfg.tune.timeout,
                                     on_trial=on_trial)
            return self.record_outcome(study, run_id)

    def log_counts(self, study: optuna.Study, run_id: str) -> tuple[int, dict[str, int]]:
        """The study's trial count per state, logged on its MLflow run as ``n_<state>``; returns
        (number of trials, the counts). Shared with the race's study (:mod:`.race_study`)."""
        trials = study.get_trials(deepcopy=False)
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        self.tracker.log_metrics(run_id, {f"n_{k}": v for k, v in counts.items()},
                                 step=len(trials))
        return len(trials), counts

    def record_outcome(self, study: optuna.Study, run_id: str) -> StudyOutcome:
        """Trial counts and the best trial, logged on the study's MLflow run."""
        n_trials, counts = self.log_counts(study, run_id)
        best = _best(study)
        if best is None:
            self.tracker.set_tags(run_id, {"optuna.best_trial_number": "none"})
            return StudyOutcome(self.spec, run_id, None, None, counts)
        self.tracker.set_tags(run_id, {"optuna.best_trial_number": best.number,
                                       **{f"best.{k}": v for k, v in best.params.items()}})
        self.tracker.log_metrics(run_id, {"best_value": best.value,
                                          **{f"best.{k}": float(v)
                                             for k, v in best.params.items()}},
                                 step=n_trials)
        return StudyOutcome(self.spec, run_id, dict(best.params), best.value, counts)


def study_worker(cfg: BenchmarkConfig, tracker: Tracker, data: Any, spec: StudySpec,
                 url: str, study_run_id: str, parent_id: str, worker_index: int,
                 runner_cls: type[StudyRunner] | None = None,
                 worker_settings: dict[str, Any] | None = None) -> int:
    """One tuning worker (a local process or a Ray task): fill the study up to ``n_trials``.

    Several workers may share a study: each reserves its trials under the storage's quota lock
    (:func:`study_storage.fill_study`), samples with its own seed, and logs its trial runs
    under the study's MLflow run. ``runner_cls`` (default :class:`StudyRunner`; the race's
    :class:`~.race_study.RaceRunner`) built with ``worker_settings`` (what
    :meth:`StudyRunner.worker_settings` returned) runs the trials. Returns the number of
    trials this worker ran.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bundle = data.get(spec.data_cell(cfg.tune.seed))
    weights, source = starting_weights(cfg, bundle, tracker, parent_id,
                                       dataset=spec.dataset)
    storage = open_storage(url)
    runner = (runner_cls or StudyRunner)(cfg, spec, tracker, storage, url, bundle, weights,
                                         source, **(worker_settings or {}))
    runner.study_run_id = study_run_id
    return study_storage.fill_study(runner.load_study(worker_index), runner.objective,
                                    n_trials=cfg.tune.n_trials, url=url, timeout=cfg.tune.timeout)


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


# -- the whole tuning stage -------------------------------------------------------------------
@dataclass
class TuningOutcome:
    """The final grid's cells (best params per strategy) and the strategies that got none."""

    cells: list[Cell]
    failed: list[CellResult]  # for strategies whose study completed no trial
    studies: list[StudyOutcome]


def final_cells(cfg: BenchmarkConfig, outcome: StudyOutcome) -> list[Cell]:
    """The strategy's best parameters on every seed of the config."""
    assert outcome.best_params is not None
    params, overrides = split_params(outcome.best_params)
    spec = outcome.spec
    return [Cell(dataset=spec.dataset, strategy=spec.strategy, params={**spec.fixed, **params},
                 seed=seed, overrides=overrides, study=spec.name) for seed in cfg.seeds]


def control_cells(cfg: BenchmarkConfig, outcome: StudyOutcome, control: str) -> list[Cell]:
    """``control``'s cells at the tuned parameters of ``outcome`` (the study of the strategy it
    controls): every parameter the control has (MetaLR's ``backbone_lr_scale``, head pin,
    optimizer for ``discriminative``), the same config overrides (lr, ...), on every seed; the
    rest (hyper_lr, update rule, bounds, meta-step settings) is the hyper-gradient the control
    leaves out. The control's own params in the config are ignored (with a warning)."""
    assert outcome.best_params is not None
    spec = outcome.spec
    params, overrides = split_params(outcome.best_params)
    fields = get_strategy(control).Params.model_fields
    taken = {k: v for k, v in {**spec.fixed, **params}.items() if k in fields}
    own = next((s.params for s in cfg.strategies if s.name == control), {})
    if own and any(taken.get(k) != v for k, v in own.items()):
        log.warning("strategy %s runs at %s's tuned parameters; its own params %s are ignored",
                    control, spec.strategy, own)
    meta = {**spec.fixed, **params}.get("meta_source")
    if meta in ("holdout", "fixed"):
        log.warning("%s holds out 20 %% of the training images for its meta batches (meta_source "
                    "%s); %s trains on all of them, so the two do not see the same data",
                    spec.strategy, meta, control)
    return [Cell(dataset=spec.dataset, strategy=control, params=taken, seed=seed,
                 overrides=overrides, study=spec.name, tuned_from=spec.strategy)
            for seed in cfg.seeds]


def tune_all(cfg: BenchmarkConfig, tracker: Tracker, parent_id: str, data: Any,
             *, progress: bool = True, executor: Any = None,
             tracking_uri: str | None = None) -> TuningOutcome:
    """Run (or continue) every study under ``parent_id``; return the final grid to train.

    With a parallel ``executor`` (local processes, Ray) every study's workers run as calls of
    that executor (:func:`study_worker`), ``tune.workers_per_study`` per study; otherwise the
    studies run one after the other in this process.
    """
    controls = tuned_controls(cfg)  # no study of their own: they take another's parameters
    specs = [spec for spec in study_specs(cfg, data) if spec.strategy not in controls]
    url = storage_url(cfg)
    storage = open_storage(url)
    tracker.set_tags(parent_id, {"tuned": "true", "optuna.storage": url})
    # "A new study created …" / "Trial n finished …" at INFO for every study and trial: the bar
    # says it, and --no-progress asks for silence; warnings still print
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies: list[StudyOutcome] = []
    bar = tqdm(total=len(specs) * cfg.tune.n_trials, desc="tuning", unit="trial",
               disable=not progress)
    try:
        for spec in specs:  # the pretrain stage runs (once, cached) here, never in the workers
            bundle = data.get(spec.data_cell(cfg.tune.seed))
            bar.set_postfix_str(f"{spec.dataset.dataset_key} {spec.strategy}: loading "
                                f"{cfg.model.weights} weights (the pretrain stage runs once, "
                                "then is cached)")
            weights, source = starting_weights(cfg, bundle, tracker, parent_id, progress=progress,
                                               dataset=spec.dataset)
            if executor is None or executor.name == "serial":
                runner = StudyRunner(cfg, spec, tracker, storage, url, bundle, weights, source)
                studies.append(runner.run(parent_id, bar))
        if executor is not None and executor.name != "serial":
            runners = [StudyRunner(cfg, spec, tracker, storage, url, None, None, "")
                       for spec in specs]
            studies = tune_in_workers(cfg, runners, parent_id, executor,
                                      tracking_uri or cfg.tracking_uri, bar)
    finally:
        bar.close()
    return _outcome(cfg, studies)


def tune_in_workers(cfg: BenchmarkConfig, runners: list[StudyRunner], parent_id: str,
                    executor: Any, tracking_uri: str, bar: Any, *,
                    workers: int | None = None) -> list[StudyOutcome]:
    """Create the studies and their MLflow runs here, run the workers through ``executor``:
    ``workers`` per study (default ``tune.workers_per_study``), each a :func:`study_worker`
    building a twin of its runner (same class, :meth:`StudyRunner.worker_settings`)."""
    per_study = workers or cfg.tune.workers_per_study
    if executor.name == "ray" and study_storage.is_journal(runners[0].storage_label):
        log.warning("tuning on Ray with a journal file: every node must see %s (shared file "
                    "system), or pass an RDB URL with --tune-storage", runners[0].storage_label)
    with ExitStack() as stack:
        calls, labels, studies = [], [], []
        for r in runners:
            study = r.create_study()
            run_id = stack.enter_context(r.study_run(parent_id))
            r.recover_interrupted(study)  # before any worker starts: RUNNING means killed
            studies.append((r, study, run_id))
            for w in range(per_study):
                calls.append((r.spec, r.storage_label, run_id, parent_id, w, type(r),
                              r.worker_settings()))
                labels.append(f"{r.spec.dataset.dataset_key} {r.spec.strategy} worker {w}")
        names = [r.spec.name for r in runners]
        bar.n = study_storage.count_finished(runners[0].storage, names)
        bar.refresh()
        results = executor.map_calls(
            study_worker, cfg, tracking_uri, calls, labels=labels, bar=bar,
            count=lambda: min(study_storage.count_finished(runners[0].storage, names), bar.total),
        )
        for label, res in zip(labels, results, strict=True):
            if isinstance(res, BaseException):
                log.error("tuning %s: worker failed (%s); its study may miss trials",
                          label, res)
        return [r.record_outcome(optuna.load_study(study_name=r.spec.name, storage=r.storage),
                            run_id) for r, _, run_id in studies]


def _outcome(cfg: BenchmarkConfig, studies: list[StudyOutcome]) -> TuningOutcome:
    """The final grid: each study's best params on every seed; a study without a COMPLETE
    trial fails its strategy's cells with a pointer to the trial runs."""
    cells: list[Cell] = []
    failed: list[Any] = []
    controls = tuned_controls(cfg)
    for outcome in studies:
        spec = outcome.spec
        mine = [c for c, of in controls.items() if of == spec.strategy]
        if outcome.best_params is not None:
            cells += final_cells(cfg, outcome)
            for control in mine:
                cells += control_cells(cfg, outcome, control)
            continue
        error = (f"study {spec.name} completed no trial ({outcome.counts}); "
                 f"see the trial runs under MLflow run {outcome.run_id}")
        log.error(error)
        for name in (spec.strategy, *mine):
            failed += [CellResult(Cell(dataset=spec.dataset, strategy=name,
                                       params=spec.fixed if name == spec.strategy else {},
                                       seed=s, study=spec.name,
                                       tuned_from=None if name == spec.strategy else spec.strategy),
                                  outcome.run_id, "", "FAILED", error=error) for s in cfg.seeds]
    return TuningOutcome(cells, failed, studies)
