"""SIGTERM behaves like Ctrl-C: the grid stops cleanly instead of dying mid-write.

Why: a scheduler (Slurm, Kubernetes, ``timeout``) stops jobs with SIGTERM. Python's default is
to die at once, leaving the MLflow run RUNNING forever. Raising :class:`Terminated` (a
``KeyboardInterrupt``) instead reuses the Ctrl-C path: the current cell's run and the parent
run are marked KILLED, the checkpoint of the last completed epoch stays on disk, and the CLI
exits 143 (130 for Ctrl-C). Re-running the same command resumes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""

    exit_code = 143


def exit_code_for(exc: KeyboardInterrupt) -> int:
    return getattr(exc, "exit_code", 130)


def interrupted_message(exc: KeyboardInterrupt) -> str:
    """What the CLI says after Ctrl-C / SIGTERM. ``exc.checkpointed`` (set by the runner's
    cell when it was the one interrupted) tells whether the run has a checkpoint: one stopped
    before its first epoch ended has none, and the message used to claim one anyway."""
    checkpointed = getattr(exc, "checkpointed", None)
    head = "run-benchmark: interrupted; finished runs are in MLflow, the interrupted run is marked KILLED"
    if checkpointed is True:
        return (f"{head} and its last epoch is checkpointed: run the same command again to "
                "resume")
    if checkpointed is False:
        return (f"{head}; it was stopped before its first epoch ended, so it has no checkpoint "
                "and starts over: run the same command again to go on with the grid")
    return (f"{head}: run the same command again to resume (from the last epoch's checkpoint "
            "where one was written)")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; else no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"received signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
