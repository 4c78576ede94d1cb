"""Optuna storages and the trial loop that several workers can share.

Why one module: the tuning stage (:mod:`tuning`) opens the storage in the driver and again in
every study worker (a local process or a Ray task, :mod:`executors`), and all of them must fill a
study with *exactly* ``n_trials`` finished trials whether one process or many work on it.

- A path (no ``scheme://``) is a ``JournalStorage`` file: safe for concurrent processes on one
  host (or a shared file system), no server needed.
- ``sqlite:///...``, ``postgresql://...``, ``mysql://...``: an ``RDBStorage``.

Exactness: ``study.optimize(n_trials=k)`` per worker over- or under-shoots when workers race.
:func:`fill_study` reserves each trial under a lock (count RUNNING + COMPLETE + PRUNED trials,
``ask`` only below the quota). A failed trial (exception in the objective) is recorded as FAIL
and does not count, so another worker replaces it. The lock is a file lock next to a journal
file or a SQLite database (one host, or a shared file system), and a row lock
(``SELECT ... FOR UPDATE``) in the storage's own database for a database server, so workers on
several hosts sharing a PostgreSQL/MySQL storage are exact too.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import TrialState

log = logging.getLogger(__name__)

#: trial states that count towards ``n_trials`` (a FAIL is run again)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
_RESERVED = (*FINISHED_STATES, TrialState.RUNNING, TrialState.WAITING)


class StorageError(ValueError):
    """An Optuna storage that cannot be opened (bad URL, missing driver, unreachable server)."""


def is_journal(url: str) -> bool:
    return "://" not in url


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A ``JournalStorage`` for a file path, an ``RDBStorage`` for a URL."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if is_journal(url):
        path = Path(url).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # concurrent writers wait
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as exc:  # bad driver, unreachable server, ...
        raise StorageError(f"cannot open Optuna storage {url!r}: {exc}") from None


def _lock_path(url: str) -> Path | None:
    """A lock file next to a storage on this host's file system; None for a database server."""
    if is_journal(url):
        return Path(url).expanduser().with_suffix(".quota.lock")
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):] + ".quota.lock").expanduser()
    return None


#: the table of named row locks in a database server's Optuna database (one row per study)
LOCK_TABLE = "metalr_bench_quota_locks"


@functools.lru_cache(maxsize=8)
def _lock_engine(url: str) -> tuple[sa.Engine, sa.Table]:
    """One engine per storage URL and process (its pool holds the lock connections)."""
    engine = sa.create_engine(url, pool_pre_ping=True)
    table = sa.Table(LOCK_TABLE, sa.MetaData(), sa.Column("name", sa.String(255), primary_key=True))
    try:
        table.create(engine, checkfirst=True)
    except sa.exc.SQLAlchemyError:  # another worker created it at the same moment
        if not sa.inspect(engine).has_table(LOCK_TABLE):
            raise
    return engine, table


@contextlib.contextmanager
def _row_lock(url: str, name: str) -> Iterator[None]:
    """``SELECT ... FOR UPDATE`` on row ``name``, held until the block ends (then committed).

    Why a row of our own table: the lock must outlive Optuna's ``ask`` (another connection, which
    inserts the trial) without blocking it, so it cannot sit on Optuna's own rows.
    """
    engine, table = _lock_engine(url)
    with engine.connect() as conn:
        try:
            with conn.begin():
                conn.execute(sa.insert(table).values(name=name))
        except sa.exc.IntegrityError:
            pass  # the row exists: the usual case
        with conn.begin():
            conn.execute(sa.select(table.c.name).where(table.c.name == name).with_for_update())
            yield


@contextlib.contextmanager
def quota_lock(url: str, name: str = "quota") -> Iterator[None]:
    """Exclusive for ``name`` (a study) across every worker of this storage: a file lock on
    this host's file system, a row lock in a database server."""
    path = _lock_path(url)
    if path is None:
        with _row_lock(url, name):
            yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def reserve_trial(study: optuna.Study, n_trials: int, url: str) -> optuna.Trial | None:
    """A new trial if the study holds fewer than ``n_trials`` finished or running ones."""
    with quota_lock(url, study.study_name):
        if len(study.get_trials(deepcopy=False, states=_RESERVED)) >= n_trials:
            return None
        return study.ask()


def fill_study(
    study: optuna.Study, objective: Callable[[optuna.Trial], float], *, n_trials: int, url: str,
    max_failures: int | None = None, timeout: float | None = None,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
) -> int:
    """Run trials until the study holds ``n_trials`` finished ones; returns how many ran here.

    Several processes may call this on the same study at once. ``TrialPruned`` -> PRUNED, an
    exception -> FAIL (logged; after ``max_failures`` of them, default ``n_trials``, this worker
    gives up), ``KeyboardInterrupt`` -> FAIL and propagates (a worker killed without a word
    leaves its trial RUNNING until a driver finds it dead: :mod:`stale_trials`). ``timeout``:
    no new trial starts after that many seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    failures, ran = 0, 0
    limit = max_failures or n_trials
    while deadline is None or time.monotonic() < deadline:
        trial = reserve_trial(study, n_trials, url)
        if trial is None:
            break
        try:
            value = objective(trial)
        except KeyboardInterrupt:  # Ctrl-C: the trial is over, and so is this worker
            with contextlib.suppress(Exception):
                study.tell(trial, state=TrialState.FAIL)
            raise
        except optuna.TrialPruned:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        except Exception:
            log.exception("study %s trial %d failed", study.study_name, trial.number)
            frozen = study.tell(trial, state=TrialState.FAIL)
            failures += 1
        else:
            frozen = study.tell(trial, value)
        ran += 1
        if on_trial is not None:
            on_trial(frozen)
        if failures >= limit:
            log.error("study %s: %d failed trials, this worker gives up", study.study_name,
                      failures)
            break
    return ran


def count_finished(storage: optuna.storages.BaseStorage, names: list[str]) -> int:
    """Finished trials over several studies (the driver's progress bar while workers run)."""
    total = 0
    for name in names:
        study_id = storage.get_study_id_from_name(name)
        total += sum(t.state in FINISHED_STATES
                     for t in storage.get_all_trials(study_id, deepcopy=False))
    return total
