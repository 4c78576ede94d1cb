"""A RUNNING MLflow run says it is alive: its ``run.heartbeat`` tag is refreshed every minute.

Why: a re-run must tell a run whose process is still working from one whose process died
without a word (SIGKILL, a lost Ray node, a power cut), or the dead run blocks its cell as
"busy" forever. On the run's own host the pid answers that (:func:`resume.stale_reason`); from
another host only time can: a run whose last heartbeat is older than :data:`STALE_AFTER_S` is
dead. A background thread beats independently of how long an epoch takes.

The beat is one tag write; a failed write (server down) is skipped, the next one retries, so a
heartbeat never slows or breaks training. Hosts are assumed to keep their clocks in sync (NTP):
the tag holds the writer's Unix time and the reader compares it with its own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

TAG = "run.heartbeat"
#: seconds between beats
INTERVAL_S = 60.0
#: a run on another host without a beat for this long is dead (10 missed beats: slow tracking
#: servers and clock drift of a few minutes do not kill live runs)
STALE_AFTER_S = 600.0


@contextlib.contextmanager
def heartbeat(client: Any, run_id: str, interval: float = INTERVAL_S) -> Iterator[None]:
    """Beat for ``run_id`` (an :class:`MlflowClient` ``client``) while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                client.set_tag(run_id, TAG, f"{time.time():.0f}")
            except Exception as exc:  # the next beat retries; training goes on
                log.debug("heartbeat of run %s not written: %s", run_id, exc)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2.0)  # a daemon: a beat stuck on a dead server must not hold us


def silent_for(tags: dict[str, str], now: float | None = None) -> float | None:
    """Seconds since the run's last beat; None when it never beat (runs of older versions)."""
    try:
        last = float(tags[TAG])
    except (KeyError, ValueError):
        return None
    return (time.time() if now is None else now) - last
