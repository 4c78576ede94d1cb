"""The race's search: one Optuna study per dataset across strategies, Hyperband-pruned.

Why one study rather than one per strategy: a researcher with a new dataset asks "which
strategy?", and the grid answers it only after paying every strategy's full tuning budget.
Racing (successive halving / Hyperband, Li et al., JMLR 2018) spends the budget where it pays:
the study's first choice is the strategy (a categorical over the config's strategies), then that
strategy's own search space, define-by-run, so the space is conditional; Hyperband stops weak
configurations after their first epochs, on the same per-epoch validation metric the grid's
tuning reports (:class:`studies.PruningReporter`, through :meth:`StudyRunner.train_trial`).

* **No strategy gets a wider space than in the grid**: each arm is the
  :class:`studies.StudySpec` the grid's tuning would build (:func:`studies.study_specs`:
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

import logging
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
    REPORT_STEPS,
    StudyOutcome,
    StudyRunner,
    StudySpec,
    direction,
    study_specs,
)
from optuna.trial import TrialState

log = logging.getLogger(__name__)

#: the study's first parameter: which strategy a trial trains
STRATEGY_PARAM = "strategy"


@dataclass(frozen=True)
class RaceSpec:
    """One race: a dataset and its arms (one grid study spec per strategy, in config order).

    It quacks like a :class:`StudySpec` for :class:`StudyRunner` (``strategy``, ``fixed``,
    ``space``, ``name``): the study run logs the namespaced space.
    """

    dataset: DatasetSpec
    arms: dict[str, StudySpec]
    name: str
    strategy: str = "race"
    space: dict[str, SearchDim] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def data_cell(self, seed: int) -> Cell:
        """The cell whose data (and starting weights) every arm trains on: the first arm's
        (the arms of one dataset share both)."""
        return Cell(dataset=self.dataset, strategy=next(iter(self.arms)), params={}, seed=seed)


def race_name(cfg: BenchmarkConfig, dataset: DatasetSpec, arms: dict[str, StudySpec]) -> str:
    """``<benchmark>-<dataset>@<size>-race-<hash>``; the hash covers every arm's study name
    (which hashes its trial identity, space and metric), in order: the categorical's choices."""
    payload = {"race": [arms[s].name for s in arms], "metric": cfg.tune.metric,
               "steps": REPORT_STEPS}
    return f"{cfg.name}-{dataset.dataset_name}@{dataset.size}-race-{stable_hash(payload)[:8]}"


def race_specs(cfg: BenchmarkConfig, data: Any) -> list[RaceSpec]:
    """One race per dataset (cross-validation folds: one each), validated before any training."""
    by_dataset: dict[str, tuple[DatasetSpec, dict[str, StudySpec]]] = {}
    for spec in study_specs(cfg, data):
        key = spec.dataset.model_dump_json()
        by_dataset.setdefault(key, (spec.dataset, {}))[1][spec.strategy] = spec
    out = []
    for dataset, arms in by_dataset.values():
        space = {f"{s}.{k}": d for s, a in arms.items() for k, d in a.space.items()}
        fixed = {f"{s}.{k}": v for s, a in arms.items() for k, v in a.fixed.items()}
        out.append(RaceSpec(dataset, arms, race_name(cfg, dataset, arms), space=space,
                              fixed=fixed))
    return out


def arm_values(values: dict[str, Any], strategy: str) -> dict[str, Any]:
    """A trial's values of ``strategy``'s own dimensions, un-namespaced (``lr``, ``alpha``)."""
    prefix = f"{strategy}."
    return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}


def arm_cell(cfg: BenchmarkConfig, spec: RaceSpec, values: dict[str, Any], seed: int,
             ) -> Cell:
    """The cell of a trial's (or the best trial's) values, at ``seed``, marked with the race's
    study (``Cell.study``: its runs are tagged tuned, with the race's study name)."""
    strategy = values[STRATEGY_PARAM]
    arm = spec.arms[strategy]
    params, overrides = split_params(arm_values(values, strategy))
    return Cell(dataset=spec.dataset, strategy=strategy, params={**arm.fixed, **params},
                seed=seed, overrides=overrides, study=spec.name)


class RaceRunner(StudyRunner):
    """:class:`StudyRunner` whose trial first picks the strategy; Hyperband-pruned."""

    spec: RaceSpec

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

    def worker_settings(self) -> dict[str, Any]:
        return {"min_epochs": self.min_epochs}

    def objective(self, trial: optuna.Trial) -> float:
        spec = self.spec
        strategy = trial.suggest_categorical(STRATEGY_PARAM, list(spec.arms))
        values: dict[str, Any] = {STRATEGY_PARAM: strategy}
        for name, dim in spec.arms[str(strategy)].space.items():
            values[f"{strategy}.{name}"] = dim.suggest(trial, f"{strategy}.{name}")
        return self.train_trial(trial, arm_cell(self.cfg, spec, values, self.cfg.tune.seed))

    def top_up(self, parent_id: str) -> StudyOutcome | None:
        """Race every named strategy to full resource: each strategy without a COMPLETE trial
        gets one more trial, unpruned, at the full trial length, with the params of its best
        trial at its deepest rung (sampled, when it never had a trial). None when nothing was
        missing.

        Why: Hyperband stops a strategy at its first rungs on a few trials; a strategy the user
        named would otherwise leave the race without ever training as long as the others
        (issue 38: three strategies named, one complete trial, "It is the only strategy").
        Serial, in this process (a few trials). A top-up trial that fails leaves its strategy
        out of the race, and the summary says so (:func:`standings`). On a re-run the strategies
        that have a COMPLETE trial are not topped up again.
        """
        study = optuna.load_study(study_name=self.spec.name, storage=self.storage,
                                  sampler=self.sampler(self.cfg.tune.seed + 7919),
                                  pruner=optuna.pruners.NopPruner())
        complete = {t.params.get(STRATEGY_PARAM) for t in study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,))}
        missing = [s for s in self.spec.arms if s not in complete]
        if not missing:
            return None
        curves = _curves(study, self.epochs)
        with self.study_run(parent_id) as run_id:
            for s in missing:
                params: dict[str, Any] = {STRATEGY_PARAM: s}
                if s in curves:  # its best trial at its deepest rung
                    deepest = max(max(c) for _, c in curves[s])
                    sign = -1.0 if direction(self.cfg.tune.metric) == "maximize" else 1.0
                    best = min(((t, c) for t, c in curves[s] if max(c) == deepest),
                               key=lambda p: (min(sign * v for v in p[1].values()),
                                              p[0].number))
                    params = dict(best[0].params)
                study.enqueue_trial(params, user_attrs={"race.top_up": True})
                trial = study.ask()
                try:
                    value = self.objective(trial)
                except KeyboardInterrupt:
                    study.tell(trial, state=TrialState.FAIL)
                    raise
                except Exception as exc:
                    log.warning("race %s: the full-resource trial %d of %s failed (%s); it "
                                "leaves the race", self.spec.name, trial.number, s, exc)
                    trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, value)
            return self.record_outcome(study, run_id)

    def record_outcome(self, study: optuna.Study, run_id: str) -> StudyOutcome:
        """Trial counts, the best trial and each strategy's leader on the study's run (the
        grid's summary would log the categorical ``strategy`` as a number)."""
        n_trials, counts = self.log_counts(study, run_id)
        board = leaders(study, self.cfg.tune.metric, self.epochs)
        if not board:
            self.tracker.set_tags(run_id, {"optuna.best_trial_number": "none"})
            return StudyOutcome(self.spec, run_id, None, None, counts)
        top = board[0]
        self.tracker.set_tags(run_id, {"optuna.best_trial_number": top.trial_number,
                                       **{f"best.{k}": v for k, v in top.values.items()}})
        self.tracker.log_metrics(run_id, {
            "best_value": top.value,
            **{f"leader.{b.strategy}.value": b.value for b in board},
            **{f"n_complete.{s}": c for s, c in
               ((b.strategy, b.n_complete) for b in board)}}, step=n_trials)
        return StudyOutcome(self.spec, run_id, dict(top.values), top.value,
                            counts)


@dataclass(frozen=True)
class Leader:
    """A strategy's standing in the race at the gate's rung.

    ``value`` is the best validation value its trials reached within ``rung`` epochs (the
    checkpoint a trial stopped there would keep), over its trials that trained at least
    ``rung`` epochs; ``trial_number``/``values`` are that trial and its params; ``depth`` is
    the most epochs any of its trials trained.
    """

    strategy: str
    value: float
    trial_number: int
    values: dict[str, Any]  # the trial's params, namespaced, with ``strategy``
    n_complete: int
    n_pruned: int
    rung: int = 0
    depth: int = 0


def _curves(study: optuna.Study, full: int | None,
            ) -> dict[str, list[tuple[optuna.trial.FrozenTrial, dict[int, float]]]]:
    """Per strategy, its finished (COMPLETE or PRUNED) trials with their finite per-epoch
    values (steps are 1-based epochs). A COMPLETE trial without reported values (none in a
    race; a hand-told one) counts as its objective at ``full`` epochs."""
    out: dict[str, list[tuple[optuna.trial.FrozenTrial, dict[int, float]]]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        s = t.params.get(STRATEGY_PARAM)
        if s is None:
            continue
        curve = {int(k): float(v) for k, v in t.intermediate_values.items()
                 if v is not None and not math.isnan(v)}
        if not curve and t.state == TrialState.COMPLETE and t.value is not None \
                and not math.isnan(t.value):
            curve = {full or 1: float(t.value)}
        if curve:
            out.setdefault(str(s), []).append((t, curve))
    return out


def leaders(study: optuna.Study, metric: str, full: int | None = None) -> list[Leader]:
    """The race's gate: every strategy ranked at the same rung, best first.

    Why not each strategy's best COMPLETE trial (the gate before issue 38): that compared
    strategies over unequal numbers of trials and dropped outright every strategy Hyperband
    had stopped short of the last rung, so a strategy whose value is final after one epoch
    (``linear_probe``) beat one that climbs simply by being promoted. Here the rung is the
    deepest one *every* strategy reached (the fewest epochs the least-trained strategy's best
    trial got); each strategy is scored by its trials that trained that far, on their best
    value within that many epochs. No strategy is ranked on fewer completed rungs than the
    others; the race tops up (:meth:`RaceRunner.top_up`) each strategy without a trial at
    full resource, so that in a finished race the rung is the full trial length.
    """
    sign = -1.0 if direction(metric) == "maximize" else 1.0
    counts: dict[str, list[int]] = {}
    for t in study.get_trials(deepcopy=False):
        s = t.params.get(STRATEGY_PARAM)
        if s is not None:
            c = counts.setdefault(str(s), [0, 0])
            c[0] += t.state == TrialState.COMPLETE
            c[1] += t.state == TrialState.PRUNED
    curves = _curves(study, full)
    if not curves:
        return []
    depth = {s: max(max(c) for _, c in tc) for s, tc in curves.items()}
    rung = min(depth.values())
    board = []
    for s, tc in curves.items():
        scored = []
        for t, c in tc:
            if max(c) < rung:
                continue
            within = [v for k, v in c.items() if k <= rung]
            if not within:
                continue
            scored.append((sign * min(sign * v for v in within), t))
        value, best = min(((sign * v, t) for v, t in scored), key=lambda p: (p[0], p[1].number))
        board.append(Leader(s, sign * value, best.number, dict(best.params), *counts[s],
                            rung=rung, depth=depth[s]))
    return sorted(board, key=lambda b: (sign * b.value, b.trial_number))


def standings(study: optuna.Study, strategies: list[str], board: list[Leader],
              confirmed: list[str], top_k: int) -> list[dict[str, Any]]:
    """Every named strategy's line in the summary: its trials by state, the most epochs one
    trained, its value at the gate's rung, and what the race did with it (confirmed, not
    confirmed with its rank, or dropped with the evidence: no trial finished an epoch, and
    the failures' reasons)."""
    trials = study.get_trials(deepcopy=False)
    ranked = {b.strategy: (i + 1, b) for i, b in enumerate(board)}
    out = []
    for s in strategies:
        mine = [t for t in trials if t.params.get(STRATEGY_PARAM) == s]
        n = {k: sum(t.state == st for t in mine) for k, st in
             (("complete", TrialState.COMPLETE), ("pruned", TrialState.PRUNED),
              ("failed", TrialState.FAIL))}
        row: dict[str, Any] = {"strategy": s, "trials": len(mine), **n,
                               "epochs": max((len(t.intermediate_values) for t in mine),
                                             default=0)}
        if s in ranked:
            i, b = ranked[s]
            row |= {"rank": i, "rung": b.rung, "value": b.value, "trial": b.trial_number}
            row["status"] = ("confirmed" if s in confirmed else
                             f"not confirmed: rank {i} of {len(board)} at {b.rung} epoch(s) "
                             f"(the top {top_k} are confirmed)")
        else:
            reasons = sorted({str(t.user_attrs.get("fail_reason") or
                                  t.system_attrs.get("fail_reason") or "no reason recorded")
                              for t in mine if t.state == TrialState.FAIL})
            row["status"] = ("dropped: no trial of it ran" if not mine else
                             f"dropped: none of its {len(mine)} trial(s) finished an epoch"
                             + (f" ({'; '.join(reasons)[:200]})" if reasons else ""))
        out.append(row)
    return out


def trial_epochs(study: optuna.Study) -> list[tuple[str, int, TrialState]]:
    """(strategy, epochs trained, state) per trial: the compute the search spent (a pruned
    trial's epochs are its reported ones; a killed one's those it reported before dying)."""
    return [(str(t.params.get(STRATEGY_PARAM, "")), len(t.intermediate_values), t.state)
            for t in study.get_trials(deepcopy=False)]
