"""Re-running the same command continues the grid instead of starting it over.

Rules, per cell (identified by its ``config_hash`` tag, which includes the code version):

* a FINISHED run exists            -> skip the cell; its metrics feed the leaderboard;
* a checkpoint exists (the cell was interrupted) -> resume from its last epoch, logging into
  the same MLflow run when it still exists (earlier epochs' metrics are already there);
* FAILED / KILLED / stale RUNNING   -> train again;
* ``force``                         -> train again whatever exists (checkpoint discarded).

A run left RUNNING by a process that died without a word (SIGKILL, power loss, a lost Ray
node) is *stale*: its ``run.host`` tag is this machine and its ``run.pid`` is no longer alive,
or it ran on another machine and its heartbeat (:mod:`heartbeat`) has been silent for
``heartbeat.STALE_AFTER_S``. Stale runs are marked KILLED, so nothing stays RUNNING forever. A
RUNNING run owned by a live process (or beating on another machine) is left alone and the cell
is reported as busy.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from metalr_bench.benchmark import heartbeat
from metalr_bench.benchmark.checkpoint import CellCheckpoint
from metalr_bench.benchmark.tracking import Tracker
from mlflow.entities import Run, ViewType

log = logging.getLogger(__name__)

#: final numbers a skipped cell contributes to the leaderboard
SUMMARY_PREFIXES = ("test_", "best_val_")
SUMMARY_KEYS = ("best_epoch", "peak_memory_mb", "mean_epoch_time_s", "total_time_s")


def owner_tags() -> dict[str, str]:
    """Who runs this: lets a later call tell a dead run from a live one."""
    return {"run.host": platform.node(), "run.pid": str(os.getpid())}


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
    return dead_reason(tags.get("run.host", "?"), tags.get("run.pid", ""),
                       heartbeat.last_beat(tags))


def mark_stale(tracker: Tracker, runs: list[Run]) -> list[str]:
    """Mark stale RUNNING runs KILLED; returns their ids."""
    ids = []
    for run in runs:
        reason = stale_reason(run)
        if reason is not None:
            tracker.set_tags(run.info.run_id, {"failure_reason": reason})
            tracker.end_run(run.info.run_id, "KILLED")
            ids.append(run.info.run_id)
            log.warning("run %s was left RUNNING: %s; marked KILLED", run.info.run_id, reason)
    return ids


def mark_stale_parents(tracker: Tracker) -> list[str]:
    runs = tracker._call(
        tracker.client.search_runs, [tracker.experiment_id],
        filter_string="tags.kind = 'benchmark' and attributes.status = 'RUNNING'",
        run_view_type=ViewType.ACTIVE_ONLY,
    )
    return mark_stale(tracker, list(runs))


def runs_for(tracker: Tracker, config_hash: str) -> list[Run]:
    """Every live (not deleted) run of this cell in the experiment, newest first."""
    return list(tracker._call(
        tracker.client.search_runs, [tracker.experiment_id],
        filter_string=f"tags.config_hash = '{config_hash}'",
        run_view_type=ViewType.ACTIVE_ONLY, order_by=["attributes.start_time DESC"],
    ))


def summary_of(run: Run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items()
            if k.startswith(SUMMARY_PREFIXES) or k in SUMMARY_KEYS}


def busy_note(run: Run, tracking_uri: str) -> str:
    """Why a cell is left alone, and how to take it over if its owner is known to be dead."""
    tags, run_id = run.data.tags, run.info.run_id
    silent = heartbeat.silent_for(tags)
    beat = "" if silent is None else f", last heartbeat {silent:.0f} s ago"
    return (f"run {run_id} is still RUNNING on {tags.get('run.host', '?')} (pid "
            f"{tags.get('run.pid', '?')}{beat}); it is taken over once its process is gone "
            f"(same host) or its heartbeat has been silent for "
            f"{heartbeat.STALE_AFTER_S / 60:.0f} min. If you know it is dead: "
            f"`MLFLOW_TRACKING_URI={tracking_uri} mlflow runs delete --run-id {run_id}`, then run "
            "the same command again")


@dataclass
class CellPlan:
    action: Literal["skip", "busy", "resume", "new"]
    run_id: str | None = None  # skip/busy: the existing run; resume: the run to reopen (or None)
    payload: dict[str, Any] | None = None  # resume: the checkpoint payload
    summary: dict[str, float] = field(default_factory=dict)
    note: str = ""  # busy: who holds the cell and what to do

    @property
    def resume_epoch(self) -> int | None:
        return None if self.payload is None else int(self.payload["trainer"]["epoch"])


def plan_cell(tracker: Tracker, config_hash: str, checkpoint: CellCheckpoint,
              force: bool = False) -> CellPlan:
    """Decide what to do with one cell (see the module docstring)."""
    runs = runs_for(tracker, config_hash)
    stale = set(mark_stale(tracker, runs))
    if force:
        checkpoint.delete()
        return CellPlan("new")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        checkpoint.delete()  # a leftover from an older interrupted attempt
        return CellPlan("skip", finished[0].info.run_id, summary=summary_of(finished[0]))
    live = [r for r in runs if r.info.status == "RUNNING" and r.info.run_id not in stale]
    if live:
        return CellPlan("busy", live[0].info.run_id, note=busy_note(live[0], tracker.uri))
    payload = checkpoint.load()
    if payload is None:
        return CellPlan("new")
    run_id = checkpoint.meta.get("run_id")
    reopen = run_id if any(r.info.run_id == run_id for r in runs) else None
    return CellPlan("resume", reopen, payload=payload)
