"""Is the process behind a RUNNING run (or trial) still alive?

Who runs a run is written on it (:func:`owner_tags`: host and pid); a background thread
refreshes its heartbeat (:mod:`.heartbeat`). A run left RUNNING by a process that died without
a word (SIGKILL, power loss, a lost Ray node) is *stale*: its host is this machine and its pid
is gone, or it ran elsewhere and its heartbeat has been silent for
``heartbeat.STALE_AFTER_S``. Stale runs are marked KILLED (:func:`mark_stale`), so nothing stays
RUNNING forever; cells (``running.resume``), benchmark parents, pre-training runs and tuning
trials (``tuning.stale_trials``) all use these rules.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from typing import TYPE_CHECKING

from metalr_bench.benchmark.tracking import heartbeat
from metalr_bench.benchmark.tracking import tags as T
from mlflow.entities import Run

if TYPE_CHECKING:
    from metalr_bench.benchmark.tracking.client import Tracker

log = logging.getLogger(__name__)


def owner_tags() -> dict[str, str]:
    """Who runs this: lets a later call tell a dead run from a live one."""
    return {T.HOST: platform.node(), T.PID: str(os.getpid())}


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_reason(host: str, pid: str, last_beat: float | None,
                now: float | None = None) -> str | None:
    """Why an owner (``host``, ``pid``, Unix time of its last sign of life) is dead, or None
    while it may be alive: on this host the pid answers, elsewhere only the heartbeat's age.
    Shared by MLflow runs (here) and Optuna trials (:mod:`stale_trials`)."""
    if host == platform.node():
        try:
            alive = int(pid) == os.getpid() or pid_alive(int(pid))
        except ValueError:
            return None
        return None if alive else "process died (found stale)"
    if last_beat is None:
        return None
    silent = (time.time() if now is None else now) - last_beat
    if silent <= heartbeat.STALE_AFTER_S:
        return None
    return f"no heartbeat from {host or '?'} for {silent / 60:.0f} min (found stale)"


def stale_reason(run: Run) -> str | None:
    """Why ``run`` is RUNNING only on paper, or None while it may be alive."""
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    return dead_reason(tags.get(T.HOST, "?"), tags.get(T.PID, ""),
                       heartbeat.last_beat(tags))


def mark_stale(tracker: Tracker, runs: list[Run]) -> list[str]:
    """Mark stale RUNNING runs KILLED; returns their ids."""
    ids = []
    for run in runs:
        reason = stale_reason(run)
        if reason is not None:
            tracker.set_tags(run.info.run_id, {T.FAILURE_REASON: reason})
            tracker.end_run(run.info.run_id, "KILLED")
            ids.append(run.info.run_id)
            log.warning("run %s was left RUNNING: %s; marked KILLED", run.info.run_id, reason)
    return ids


def mark_stale_runs(tracker: Tracker) -> list[str]:
    """Mark every stale RUNNING run of the experiment KILLED, whatever its kind (a benchmark
    parent, a cell, a study, a trial or a pre-training run killed with ``kill -9``)."""
    return mark_stale(tracker, tracker.search_runs("attributes.status = 'RUNNING'"))
