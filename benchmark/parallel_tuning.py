"""Several Optuna workers on shared studies, finishing exactly ``n_trials`` per study.

Why: tuning a paper-scale grid is one study per (dataset, strategy), each with tens of trials;
workers in separate processes (``local``) or Ray tasks (``ray``) share the studies through one
storage:

- a journal file (``JournalStorage(JournalFileBackend(path))``) on one host: safe for concurrent
  processes, no server needed;
- an RDB URL (``postgresql://...``, ``mysql://...``) across hosts.

Exactness: ``study.optimize(n_trials=k)`` per worker over- or under-shoots when workers race.
Here each worker reserves a trial under a lock (count RUNNING + COMPLETE + PRUNED trials, ``ask``
only below the quota), so a journal-file study ends with exactly ``n_trials`` finished trials and
no duplicates. A failed trial (exception in the objective) is recorded as FAIL and does not count,
so another worker replaces it. Across hosts (RDB) there is no shared file lock; the quota check
then runs without it and can overshoot by at most ``n_workers - 1`` trials.

The objective is generic: a picklable callable ``objective(trial) -> float``, or an import path
``"package.module:name"`` resolved inside the worker; with ``objective_kwargs`` the resolved
object is a factory called as ``factory(**objective_kwargs)`` to build the objective there (so a
worker can load its dataset once).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Objective = Callable[[optuna.Trial], float]
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class TuningJob:
    """One study to fill with ``n_trials`` finished trials."""

    study_name: str
    storage: str  # a journal file path, or an RDB URL (``scheme://...``)
    objective: Objective | str
    n_trials: int
    direction: str = "maximize"
    objective_kwargs: dict[str, Any] | None = None
    sampler_seed: int = 0
    max_failures: int | None = None  # per worker; default n_trials
    user_attrs: dict[str, Any] = field(default_factory=dict)


def is_journal(storage: str) -> bool:
    return "://" not in storage


def open_storage(storage: str) -> BaseStorage:
    """A journal file path -> ``JournalStorage``; ``scheme://...`` -> ``RDBStorage``."""
    if is_journal(storage):
        Path(storage).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(Path(storage).expanduser())))
    return RDBStorage(storage)


def resolve_objective(job: TuningJob) -> Objective:
    obj: Any = job.objective
    if isinstance(obj, str):
        module, _, name = obj.partition(":")
        if not name:
            raise ValueError(f"objective {obj!r}: expected 'package.module:name'")
        obj = getattr(importlib.import_module(module), name)
    if job.objective_kwargs is not None:
        obj = obj(**job.objective_kwargs)
    if not callable(obj):
        raise TypeError(f"objective of study {job.study_name!r} is not callable: {obj!r}")
    return obj


@contextlib.contextmanager
def _quota_lock(job: TuningJob) -> Iterator[None]:
    """Exclusive across processes on this host (journal file); a no-op for RDB URLs."""
    if not is_journal(job.storage):
        yield
        return
    lock_path = Path(job.storage).expanduser().with_suffix(".quota.lock")
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def create_studies(jobs: list[TuningJob]) -> None:
    """Create every study once in the driver, so workers only load them."""
    for job in jobs:
        study = optuna.create_study(study_name=job.study_name, storage=open_storage(job.storage),
                                    direction=job.direction, load_if_exists=True)
        for k, v in job.user_attrs.items():
            study.set_user_attr(k, v)


def _reserve(study: optuna.Study, job: TuningJob) -> optuna.Trial | None:
    with _quota_lock(job):
        if len(study.get_trials(deepcopy=False, states=_COUNTED)) >= job.n_trials:
            return None
        return study.ask()


def tuning_worker(jobs: list[TuningJob], worker_index: int) -> dict[str, int]:
    """Fill every study up to its quota; returns trials finished by this worker per study."""
    done: dict[str, int] = {}
    for job in jobs:
        sampler = optuna.samplers.TPESampler(seed=job.sampler_seed + 1000 * worker_index)
        study = optuna.load_study(study_name=job.study_name, storage=open_storage(job.storage),
                                  sampler=sampler)
        objective = resolve_objective(job)
        failures, limit = 0, job.max_failures or job.n_trials
        done[job.study_name] = 0
        while (trial := _reserve(study, job)) is not None:
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
            except Exception:
                log.exception("study %s trial %d failed", job.study_name, trial.number)
                study.tell(trial, state=TrialState.FAIL)
                failures += 1
                if failures >= limit:
                    log.error("study %s: %d failed trials in worker %d, giving up",
                              job.study_name, failures, worker_index)
                    break
                continue
            else:
                study.tell(trial, value)
            done[job.study_name] += 1
    return done


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_parallel_tuning(
    jobs: list[TuningJob], n_workers: int, *, executor: str = "local",
    gpus_per_worker: float = 0.0, ray_address: str | None = None, progress: bool = True,
) -> dict[str, optuna.Study]:
    """Run ``n_workers`` workers over ``jobs``; return the loaded studies when all are full.

    ``executor``: ``serial`` (in this process), ``local`` (spawn processes; set
    ``CUDA_VISIBLE_DEVICES`` per worker yourself or use one GPU) or ``ray`` (one Ray task per
    worker with ``num_gpus=gpus_per_worker``).
    """
    if n_workers < 1:
        raise ValueError(f"n_workers={n_workers}: expected >= 1")
    if executor == "ray" and any(is_journal(j.storage) for j in jobs):
        log.warning("journal-file storage with Ray: all Ray workers must share this file system")
    create_studies(jobs)
    total = sum(j.n_trials for j in jobs)
    with tqdm(total=n_workers, desc=f"tuning ({total} trials)", unit="worker",
              disable=not progress) as bar:
        if executor == "serial" or n_workers == 1:
            tuning_worker(jobs, 0)
            bar.update(n_workers)
        elif executor == "local":
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            threads = max(1, (os.cpu_count() or 1) // n_workers)
            with ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn"),
                                     initializer=_init_worker, initargs=(threads,)) as pool:
                futures = [pool.submit(tuning_worker, jobs, i) for i in range(n_workers)]
                for fut in as_completed(futures):
                    fut.result()
                    bar.update()
        elif executor == "ray":
            from metalr_bench.benchmark.executors import import_ray

            ray = import_ray()
            started = not ray.is_initialized()
            if started:
                ray.init(address=ray_address, include_dashboard=False)
            try:
                task = ray.remote(num_gpus=gpus_per_worker, num_cpus=1,
                                  max_retries=0)(tuning_worker)
                pending = [task.remote(jobs, i) for i in range(n_workers)]
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    ray.get(ready)
                    bar.update(len(ready))
            finally:
                if started:
                    ray.shutdown()
        else:
            raise ValueError(f"executor={executor!r}: expected serial, local or ray")
    return {j.study_name: optuna.load_study(study_name=j.study_name,
                                            storage=open_storage(j.storage)) for j in jobs}
