"""The race's search: one Optuna study per dataset across strategies, Hyperband-pruned.

Why one study rather than one per strategy: a researcher with a new dataset asks "which
strategy?", and the grid answers it only after paying every strategy's full tuning budget.
Racing (successive halving / Hyperband, Li et al., JMLR 2018) spends the budget where it pays:
the study's first choice is the strategy (a categorical over the config's strategies), then that
strategy's own search space, define-by-run, so the space is conditional; Hyperband stops weak
configurations after their first epochs, on the same per-epoch validation metric the grid's
tuning reports (:class:`studies.PruningReporter`, through :meth:`StudyRunner.train_trial`).

* **No strategy gets a wider space than in the grid**: each arm is the
  :class:`studies.StudyTarget` the grid's tuning would build (:func:`studies.study_targets`:
  the declared space, ``tune.params`` overrides, ``constrain_space``, the fixed params).
* **Namespaced names**: a strategy's dimensions are ``<strategy>.<name>`` (``l2sp.lr``,
  ``l2sp.alpha``), so two strategies' ``lr`` are two parameters and the conditional space is
  clean for the sampler; TPE runs multivariate with ``group=True``, which models each
  strategy's sub-space on the trials that sampled it.
* **Resume** is the grid's: the study lives in the same storage (:func:`studies.storage_url`),
  is named from everything that defines its objective (every arm's study name, so any change of
  data, model, training settings, space or metric starts a new one; ``n_trials`` does not), and
  is opened with ``load_if_exists``; trials left RUNNING by a killed process are marked FAIL by
  :meth:`StudyRunner.recover_interrupted` (they do not count) and the exact trial loop
  (:func:`storage.fill_study`) runs only the missing ones. Its MLflow study run is reused.

* **Parallel**: with ``executor: local|ray`` the study's trials run on the executor's workers
  (:func:`studies.tune_in_workers`, the grid's own parallel tuning): each worker reserves its
  trials under the storage's quota lock and samples with its own seed, so ``n_trials`` is
  filled exactly once; serially, in this process.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from metalr_bench.benchmark.config import (
    BenchmarkConfig,
    Cell,
    ConfigError,
    DatasetSpec,
    stable_hash,
)
from metalr_bench.benchmark.tuning.space import SearchDim, split_params
from metalr_bench.benchmark.tuning.studies import (
    StudyOutcome,
    StudyRunner,
    StudyTarget,
    direction,
    study_targets,
)
from optuna.trial import TrialState

#: the study's first parameter: which strategy a trial trains
STRATEGY_PARAM = "strategy"


@dataclass(frozen=True)
class RaceTarget:
    """One race: a dataset and its arms (one grid study target per strategy, in config order).

    It quacks like a :class:`StudyTarget` for :class:`StudyRunner` (``strategy``, ``fixed``,
    ``space``, ``name``, ``dataset_key``): the study run logs the namespaced space.
    """

    dataset: DatasetSpec
    arms: dict[str, StudyTarget]
    name: str
    strategy: str = "race"
    space: dict[str, SearchDim] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset_key(self) -> str:
        return f"{self.dataset.dataset_name}@{self.dataset.size}"

    def data_cell(self, seed: int) -> Cell:
        """The cell whose data (and starting weights) every arm trains on: the first arm's
        (the arms of one dataset share both)."""
        return Cell(dataset=self.dataset, strategy=next(iter(self.arms)), params={}, seed=seed)


def race_name(cfg: BenchmarkConfig, dataset: DatasetSpec, arms: dict[str, StudyTarget]) -> str:
    """``<benchmark>-<dataset>@<size>-race-<hash>``; the hash covers every arm's study name
    (which hashes its trial identity, space and metric), in order: the categorical's choices."""
    payload = {"race": [arms[s].name for s in arms], "metric": cfg.tune.metric}
    return f"{cfg.name}-{dataset.dataset_name}@{dataset.size}-race-{stable_hash(payload)[:8]}"


def race_targets(cfg: BenchmarkConfig, data: Any) -> list[RaceTarget]:
    """One race per dataset (cross-validation folds: one each), validated before any training."""
    by_dataset: dict[str, tuple[DatasetSpec, dict[str, StudyTarget]]] = {}
    for t in study_targets(cfg, data):
        key = t.dataset.model_dump_json()
        by_dataset.setdefault(key, (t.dataset, {}))[1][t.strategy] = t
    out = []
    for dataset, arms in by_dataset.values():
        space = {f"{s}.{k}": d for s, a in arms.items() for k, d in a.space.items()}
        fixed = {f"{s}.{k}": v for s, a in arms.items() for k, v in a.fixed.items()}
        out.append(RaceTarget(dataset, arms, race_name(cfg, dataset, arms), space=space,
                              fixed=fixed))
    return out


def arm_values(values: dict[str, Any], strategy: str) -> dict[str, Any]:
    """A trial's values of ``strategy``'s own dimensions, un-namespaced (``lr``, ``alpha``)."""
    prefix = f"{strategy}."
    return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}


def arm_cell(cfg: BenchmarkConfig, target: RaceTarget, values: dict[str, Any], seed: int,
             ) -> Cell:
    """The cell of a trial's (or the best trial's) values, at ``seed``, marked with the race's
    study (``Cell.study``: its runs are tagged tuned, with the race's study name)."""
    strategy = values[STRATEGY_PARAM]
    arm = target.arms[strategy]
    params, overrides = split_params(arm_values(values, strategy))
    return Cell(dataset=target.dataset, strategy=strategy, params={**arm.fixed, **params},
                seed=seed, overrides=overrides, study=target.name)


class RaceRunner(StudyRunner):
    """:class:`StudyRunner` whose trial first picks the strategy; Hyperband-pruned."""

    target: RaceTarget

    def __init__(self, *args: Any, min_epochs: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 1 <= min_epochs <= self.epochs:
            raise ConfigError(f"`--min-epochs` {min_epochs}: Hyperband's smallest budget must "
                              f"be between 1 and the trials' epochs ({self.epochs}); lower it, "
                              "or raise `--trial-epochs` (tune.epochs)")
        self.min_epochs = min_epochs

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)

    def pruner(self) -> optuna.pruners.BasePruner:
        return optuna.pruners.HyperbandPruner(min_resource=self.min_epochs,
                                              max_resource=self.epochs)

    def worker_options(self) -> dict[str, Any]:
        return {"min_epochs": self.min_epochs}

    def objective(self, trial: optuna.Trial) -> float:
        t = self.target
        strategy = trial.suggest_categorical(STRATEGY_PARAM, list(t.arms))
        values: dict[str, Any] = {STRATEGY_PARAM: strategy}
        for name, dim in t.arms[str(strategy)].space.items():
            values[f"{strategy}.{name}"] = dim.suggest(trial, f"{strategy}.{name}")
        return self.train_trial(trial, arm_cell(self.cfg, t, values, self.cfg.tune.seed))

    def record_outcome(self, study: optuna.Study, run_id: str) -> StudyOutcome:
        """Trial counts, the best trial and each strategy's leader on the study's run (the
        grid's summary would log the categorical ``strategy`` as a number)."""
        n_trials, counts = self.log_counts(study, run_id)
        board = leaders(study, self.cfg.tune.metric)
        if not board:
            self.tracker.set_tags(run_id, {"optuna.best_trial_number": "none"})
            return StudyOutcome(self.target, run_id, None, None, counts)
        top = board[0]
        self.tracker.set_tags(run_id, {"optuna.best_trial_number": top.trial_number,
                                       **{f"best.{k}": v for k, v in top.values.items()}})
        self.tracker.log_metrics(run_id, {
            "best_value": top.value,
            **{f"leader.{b.strategy}.value": b.value for b in board},
            **{f"n_complete.{s}": c for s, c in
               ((b.strategy, b.n_complete) for b in board)}}, step=n_trials)
        return StudyOutcome(self.target, run_id, dict(top.values), top.value,
                            counts)


@dataclass(frozen=True)
class Leader:
    """A strategy's best COMPLETE trial in the race."""

    strategy: str
    value: float
    trial_number: int
    values: dict[str, Any]  # the trial's params, namespaced, with ``strategy``
    n_complete: int
    n_pruned: int


def leaders(study: optuna.Study, metric: str) -> list[Leader]:
    """Each strategy's best COMPLETE trial, best first (a strategy whose trials were all
    pruned or failed has none and is out of the race)."""
    trials = study.get_trials(deepcopy=False)
    sign = -1.0 if direction(metric) == "maximize" else 1.0
    best: dict[str, optuna.trial.FrozenTrial] = {}
    counts: dict[str, list[int]] = {}
    for t in trials:
        s = t.params.get(STRATEGY_PARAM)
        if s is None:
            continue
        c = counts.setdefault(s, [0, 0])
        c[0] += t.state == TrialState.COMPLETE
        c[1] += t.state == TrialState.PRUNED
        if t.state != TrialState.COMPLETE or t.value is None or math.isnan(t.value):
            continue
        if s not in best or sign * t.value < sign * best[s].value:
            best[s] = t
    ranked = sorted(best.values(), key=lambda t: (sign * t.value, t.number))
    return [Leader(str(t.params[STRATEGY_PARAM]), float(t.value), t.number,
                   dict(t.params), *counts[t.params[STRATEGY_PARAM]]) for t in ranked]


def trial_epochs(study: optuna.Study) -> list[tuple[str, int, TrialState]]:
    """(strategy, epochs trained, state) per trial: the compute the search spent (a pruned
    trial's epochs are its reported ones; a killed one's those it reported before dying)."""
    return [(str(t.params.get(STRATEGY_PARAM, "")), len(t.intermediate_values), t.state)
            for t in study.get_trials(deepcopy=False)]
