"""Which RUNNING Optuna trials are dead: a trial's worker says it is alive, as runs do.

Why: before its workers start, a driver marks trials left RUNNING by a killed process FAIL, so
they are run again (a RUNNING trial counts towards ``n_trials``). With two drivers on one study
(two hosts sharing a PostgreSQL storage, say), a RUNNING trial may belong to the other one,
alive: marking it FAIL would run it twice. So a trial is dead only when

* its worker (user attribute ``worker`` = ``host:pid``) ran on this host and that pid is gone, or
* it ran elsewhere and its last sign of life (user attribute ``heartbeat``, refreshed every
  minute while it trains, else its start) is older than ``heartbeat.STALE_AFTER_S``.

The same rules as :func:`liveness.stale_reason` for MLflow runs, and the same clock assumption.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import optuna
from metalr_bench.benchmark.tracking import heartbeat
from metalr_bench.benchmark.tracking.liveness import dead_reason

#: trial user attribute with the worker's Unix time of its last beat
ATTR = "heartbeat"


def worker_id() -> str:
    """Which process runs a trial (``host:pid``), on the trial and its MLflow run; computed per
    call, so a forked worker names itself and not its parent."""
    return f"{platform.node()}:{os.getpid()}"


def beat(trial: optuna.Trial, tracker: Any, run_id: str) -> None:
    """One beat of a training trial: its MLflow run's heartbeat tag and its Optuna user
    attribute (the trial's run is a ``Tracker.run`` that beats through this)."""
    now = heartbeat.now_tag()
    tracker.client.set_tag(run_id, heartbeat.TAG, now)
    trial.set_user_attr(ATTR, float(now))


def stale_reason(trial: optuna.trial.FrozenTrial, now: float | None = None) -> str | None:
    """Why a RUNNING ``trial`` is RUNNING only on paper, or None while it may be alive."""
    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    if ATTR in trial.user_attrs:
        last: float | None = float(trial.user_attrs[ATTR])
    elif trial.datetime_start is not None:  # killed before its first beat, or older versions
        last = trial.datetime_start.timestamp()
    else:
        last = None
    return dead_reason(host, pid, last, now)
