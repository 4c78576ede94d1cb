"""Where a race's trial and a cell spend their wall time, phase by phase (issue 38).

    python -m metalr_bench.benchmark.perf.profile_trial --root ../shared/data \\
        --dataset breastmnist --size 28 --arch resnet18 --n-trials 4 --trial-epochs 3

Runs a real, small, serial `run-benchmark race` (:func:`racing.orchestration.run_race`: the study, its
MLflow trial runs, the top-up, one confirmation cell per seed, the winner's model) in a temporary
folder (SQLite MLflow store and Optuna storage), with the suite's own functions wrapped by a
timer. Times are *exclusive* (a wrapped call inside another is counted once, in its own phase),
and each is booked to the context it ran in: a search trial (:meth:`StudyRunner.train_trial`,
its MLflow run and all), a confirmation cell (:func:`runner.run_cell`), or the race around them
(data, pre-training stage, studies, the model). "Outside steps" is everything but training:
:meth:`Trainer.train_step` (forward, backward, optimizer step) and a strategy's own fit before
the epochs (``before_fit``: the linear probe's L-BFGS fit on frozen features).

Why this way rather than cProfile: cProfile's per-call overhead distorts a loop of small Python
calls, and its output does not say which calls are MLflow's or Optuna's. The wrapped functions
are the phase boundaries the issue names (model build, the pre-trained copy, data loading,
steps, precise-BN, evaluation, MLflow calls, Optuna calls, study/worker start).

``--workers N`` runs the same race on N local worker processes (``--executor local``: the
study's trials and the confirmation cells spread over them, one torch thread each). Each worker
installs the same timers at start (the executor's ``METALR_BENCH_WORKER_INIT`` hook) and writes
its tallies to a file the driver merges; per-trial and per-cell figures are then sums over the
workers, and the line to compare with the serial run is the race's share of *worker time*
(N × wall) outside training steps, which counts idle workers as outside too.

Prints one table (seconds per trial / per cell / in the race outside both, and shares), then one
JSON line of all figures. On a shared CPU the absolute figures move with the load; the shares
are the figures to compare before and after a change.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from metalr_bench.benchmark.config import validate_config
from metalr_bench.benchmark.racing import orchestration as racing
from metalr_bench.benchmark.racing.settings import RaceSettings
from metalr_bench.benchmark.running.executors import WORKER_INIT_ENV
from metalr_bench.benchmark.tracking.client import Tracker
from metalr_bench.benchmark.training import cell as cell_mod
from metalr_bench.benchmark.training.trainer import Trainer
from metalr_bench.benchmark.tuning import storage as study_storage
from metalr_bench.benchmark.tuning import studies
from metalr_bench.benchmark.tuning.race_study import RaceRunner
from metalr_bench.strategies.core.registry import discover

#: (owner, attribute, phase): the timed boundaries
PHASES: list[tuple[Any, str, str]] = [
    (cell_mod.DataCache, "get", "data load/decode (DataCache)"),
    (racing, "starting_weights", "pre-training stage / weights"),
    (studies, "starting_weights", "pre-training stage / weights"),
    (cell_mod, "build_model", "model build"),
    (cell_mod, "place_model", "model build"),
    (cell_mod, "load_state", "pre-trained copy (load_state)"),
    (cell_mod, "seed_everything", "seeding"),
    (Trainer, "__init__", "trainer set-up (loaders, optimizer, start state)"),
    (Trainer, "train_step", "training steps"),
    (Trainer, "fit", "epoch loop: batches (load/augment), best-state copy"),
    (Trainer, "recalibrate_bn", "precise-BN"),
    (Trainer, "predict", "evaluation (val/test)"),
    (Tracker, "_call", "MLflow calls"),
    (optuna.Study, "ask", "Optuna calls"),
    (optuna.Study, "tell", "Optuna calls"),
    (optuna.trial.Trial, "report", "Optuna calls"),
    (optuna.trial.Trial, "should_prune", "Optuna calls"),
    (optuna.trial.Trial, "set_user_attr", "Optuna calls"),
    (optuna.trial.Trial, "suggest_float", "Optuna calls"),
    (optuna.trial.Trial, "suggest_int", "Optuna calls"),
    (optuna.trial.Trial, "suggest_categorical", "Optuna calls"),
    (study_storage, "reserve_trial", "Optuna calls"),
    (optuna, "create_study", "study start (create/load)"),
    (optuna, "load_study", "study start (create/load)"),
]
#: the contexts: a wrapped call opens one; its inclusive time is one unit of it
CONTEXTS: list[tuple[Any, str, str]] = [
    (RaceRunner, "train_trial", "trial"),
    (racing, "run_cell", "cell"),
]


class Profiler:
    """Exclusive time per (context, phase) with a stack; inclusive time per context unit."""

    def __init__(self, dump_to: Path | None = None) -> None:
        self.excl: dict[tuple[str, str], float] = defaultdict(float)
        self.units: dict[str, list[float]] = defaultdict(list)
        self.stack: list[list[Any]] = []  # [phase, start, child time]
        self.context = "race"
        self._undo: list[Callable[[], None]] = []
        self.dump_to = dump_to  # a worker's: its tallies, rewritten after each trial and cell
        self.thread = threading.get_ident()  # the thread whose calls are timed

    def dump(self) -> None:
        assert self.dump_to is not None
        tmp = self.dump_to.with_suffix(".tmp")
        tmp.write_text(json.dumps({"excl": [[c, p, v] for (c, p), v in self.excl.items()],
                                   "units": self.units}))
        tmp.replace(self.dump_to)  # whole files only: the driver may read while workers run

    def merge(self, path: Path) -> None:
        """Add a worker's tallies (its trials and cells) to this profiler's."""
        data = json.loads(path.read_text())
        for context, phase, value in data["excl"]:
            self.excl[(context, phase)] += value
        for context, values in data["units"].items():
            self.units[context].extend(values)

    def _timed(self, fn: Callable[..., Any], phase: str, context: str | None) -> Callable[..., Any]:
        prof = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != prof.thread:  # a heartbeat's MLflow call: off the
                return fn(*args, **kwargs)  # critical path, and one stack is one thread's
            outer = prof.context
            if context is not None:
                prof.context = context
            frame = [phase, time.perf_counter(), 0.0]
            prof.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                prof.stack.pop()
                total = time.perf_counter() - frame[1]
                prof.excl[(prof.context, phase)] += total - frame[2]
                if prof.stack:
                    prof.stack[-1][2] += total
                if context is not None:
                    prof.units[context].append(total)
                    prof.context = outer
                    if prof.dump_to is not None:
                        prof.dump()

        return wrapper

    def install(self) -> None:
        for owner, attr, phase in PHASES:
            self._patch(owner, attr, phase, None)
        # a strategy's own fit before the epochs (linear_probe's and lp_ft's probe: L-BFGS on
        # frozen features) is training, not overhead: its own phase
        owners = {base for cls in discover().values() for base in cls.__mro__
                  if "before_fit" in base.__dict__}  # e.g. probe.ProbeOwner
        for owner in owners:
            self._patch(owner, "before_fit", "strategy fit before epochs (probe: training)",
                        None)
        for owner, attr, ctx in CONTEXTS:
            self._patch(owner, attr, f"{ctx}: other (glue, callbacks, strategy set-up)", ctx)

    def _patch(self, owner: Any, attr: str, phase: str, context: str | None) -> None:
        orig = owner.__dict__[attr] if attr in getattr(owner, "__dict__", {}) else getattr(owner, attr)
        setattr(owner, attr, self._timed(orig, phase, context))
        self._undo.append(lambda: setattr(owner, attr, orig))

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()


#: this module by its import name (``python -m`` runs it as ``__main__``, which a worker lacks)
WORKER_MODULE = "metalr_bench.benchmark.perf.profile_trial"
#: where a profiled worker writes its tallies (set by the driver for ``--workers N``)
PROFILE_DIR_ENV = "METALR_BENCH_PROFILE_DIR"


def worker_profile() -> None:
    """The local workers' start hook (``METALR_BENCH_WORKER_INIT``): time this process too."""
    folder = Path(os.environ[PROFILE_DIR_ENV])
    Profiler(dump_to=folder / f"worker-{os.getpid()}.json").install()


def race_config(args: argparse.Namespace, folder: Path) -> Any:
    parallel = {"executor": "local", "workers": args.workers} if args.workers else {}
    return validate_config({
        **parallel,
        "name": "profile", "seeds": [0],
        "datasets": [{"adapter": args.dataset, "root": args.root, "size": args.size}],
        "strategies": args.strategies,
        "model": {"arch": args.arch, "weights": "pretrain",
                  "pretrain": {"dataset": "synthetic-source", "options": {"n_images": 256},
                               "epochs": 1, "size": args.size}},
        "epochs": args.epochs, "batch_size": args.batch, "device": "cpu",
        "precise_bn": not args.no_precise_bn, "system_metrics": False, "report": False,
        "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "output_dir": str(folder / "out"),
        "tune": {"epochs": args.trial_epochs},
    })


def table(prof: Profiler, wall: float, workers: int = 0) -> tuple[str, dict[str, Any]]:
    """``workers``: 0 for the serial race; N: the trials' and cells' figures are sums over N
    worker processes, and "race, outside" is the worker time (N × wall) they did not fill."""
    phases = sorted({p for _, p in prof.excl}, key=lambda p: (p.startswith(("trial:", "cell:")), p))
    n_trial, n_cell = len(prof.units["trial"]), len(prof.units["cell"])
    t_trial, t_cell = sum(prof.units["trial"]), sum(prof.units["cell"])
    race_s = max(workers, 1) * wall - t_trial - t_cell
    lines = [f"{'phase':52s} {'per trial s':>11s} {'%':>5s} {'per cell s':>10s} {'%':>5s} "
             f"{'race, outside s':>15s}"]
    figures: dict[str, Any] = {"wall_s": wall, "n_trials": n_trial, "n_cells": n_cell,
                               "trial_s": t_trial / max(n_trial, 1),
                               "cell_s": t_cell / max(n_cell, 1), "race_outside_s": race_s,
                               "phases": {}}
    for p in phases:
        a, b, c = (prof.excl.get((ctx, p), 0.0) for ctx in ("trial", "cell", "race"))
        pa = a / max(n_trial, 1)
        pb = b / max(n_cell, 1)
        lines.append(f"{p:52s} {pa:11.3f} {100 * a / max(t_trial, 1e-9):5.1f} {pb:10.3f} "
                     f"{100 * b / max(t_cell, 1e-9):5.1f} {c:15.2f}")
        figures["phases"][p] = {"trial_s": pa, "cell_s": pb, "race_s": c}
    training = ("training steps", "strategy fit before epochs (probe: training)")
    steps_t = sum(prof.excl.get(("trial", p), 0.0) for p in training)
    steps_c = sum(prof.excl.get(("cell", p), 0.0) for p in training)
    figures["outside_steps_trial"] = 1 - steps_t / t_trial if t_trial else None
    figures["outside_steps_cell"] = 1 - steps_c / t_cell if t_cell else None
    steps_r = sum(prof.excl.get(("race", p), 0.0) for p in training)
    # the whole race: every worker's time (N x wall; serial: the wall time) that was not training
    figures["workers"] = max(workers, 1)
    figures["outside_steps_race"] = 1 - (steps_t + steps_c + steps_r) / (max(workers, 1) * wall)
    race_other = race_s - sum(prof.excl.get(("race", p), 0.0) for p in phases)
    lines.append(f"{'race: other (answer, model export, summary)':52s} {'':11s} {'':5s} "
                 f"{'':10s} {'':5s} {race_other:15.2f}")
    lines.append(f"{'total':52s} {t_trial / max(n_trial, 1):11.3f} {100.0:5.1f} "
                 f"{t_cell / max(n_cell, 1):10.3f} {100.0:5.1f} {race_s:15.2f}")
    where = f"{workers} worker processes" if workers else "serial"
    lines.append(f"{n_trial} trial(s), {n_cell} cell(s), {where}, race wall time {wall:.1f} s. "
                 f"Outside training steps: {100 * (figures['outside_steps_trial'] or 0):.1f} % of "
                 f"a trial's wall time, {100 * (figures['outside_steps_cell'] or 0):.1f} % of a "
                 f"cell's, {100 * figures['outside_steps_race']:.1f} % of the race's "
                 + ("worker time (workers x wall, idle included)." if workers else "wall time."))
    return "\n".join(lines), figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="../shared/data",
                   help="the folder holding <dataset>.npz (the configs' ../shared/data)")
    p.add_argument("--dataset", default="breastmnist")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--strategies", nargs="+", default=["full", "linear_probe"],
                   help="the race's strategies (default: the reference and one with a one-off "
                   "fit before its epochs, the two phase shapes a trial has)")
    p.add_argument("--n-trials", type=int, default=4)
    p.add_argument("--trial-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="the confirmation cell's epochs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-precise-bn", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=0,
                   help="N local worker processes (--executor local --workers N, one torch "
                   "thread each); 0: the serial race in this process")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error(f"--workers: expected 0 (serial) or a number of worker processes, got {args.workers}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="profile-trial-") as tmp:
        cfg = race_config(args, Path(tmp))
        prof = Profiler()
        prof.install()
        workers_dir = Path(tmp) / "workers"
        workers_dir.mkdir()
        os.environ.update({WORKER_INIT_ENV: f"{WORKER_MODULE}:worker_profile",
                           PROFILE_DIR_ENV: str(workers_dir)})
        t0 = time.perf_counter()
        try:
            racing.run_race(cfg, RaceSettings(n_trials=args.n_trials, top_k=1),
                            progress=False)
        finally:
            wall = time.perf_counter() - t0
            prof.uninstall()
            for key in (WORKER_INIT_ENV, PROFILE_DIR_ENV):
                os.environ.pop(key, None)
        for path in sorted(workers_dir.glob("worker-*.json")):
            prof.merge(path)
    text, figures = table(prof, wall, args.workers)
    print(text)
    print(json.dumps({"args": vars(args), "torch_threads": torch.get_num_threads(), **figures}))


if __name__ == "__main__":
    main()
