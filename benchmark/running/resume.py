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
from dataclasses import dataclass, field
from typing import Any, Literal

from metalr_bench.benchmark.tracking import heartbeat
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.benchmark.tracking.client import Tracker
from metalr_bench.benchmark.tracking.liveness import mark_stale
from metalr_bench.benchmark.training.checkpoint import CellCheckpoint
from mlflow.entities import Run

log = logging.getLogger(__name__)

#: final numbers a skipped cell contributes to the leaderboard
SUMMARY_PREFIXES = ("test_", "best_val_")
SUMMARY_KEYS = ("best_epoch", "peak_memory_mb", "mean_epoch_time_s", "total_time_s")


def runs_for(tracker: Tracker, config_hash: str) -> list[Run]:
    """Every live (not deleted) run of this cell in the experiment, newest first."""
    return tracker.search_runs(f"tags.{T.CONFIG_HASH} = '{config_hash}'",
                               order_by=["attributes.start_time DESC"])


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
