"""A RUNNING MLflow run says it is alive: its ``run.heartbeat`` tag is refreshed every minute.

Why: a re-run must tell a run whose process is still working from one whose process died
without a word (SIGKILL, a lost Ray node, a power cut), or the dead run blocks its cell as
"busy" forever. On the run's own host the pid answers that (:func:`liveness.stale_reason`); from
another host only time can: a run whose last heartbeat is older than :data:`STALE_AFTER_S` is
dead. A background thread beats independently of how long an epoch takes.

The beat is one tag write; a failed write (server down) is skipped, the next one retries, so a
heartbeat never slows or breaks training. Hosts are assumed to keep their clocks in sync (NTP):
the tag holds the writer's Unix time and the reader compares it with its own. Tuning trials beat
the same way, into their MLflow run and an Optuna user attribute (:mod:`stale_trials`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from metalr_bench.benchmark.tracking import tags as T

log = logging.getLogger(__name__)

TAG = T.HEARTBEAT
#: seconds between beats
INTERVAL_S = 60.0
#: a run on another host without a beat for this long is dead (10 missed beats: slow tracking
#: servers and clock drift of a few minutes do not kill live runs)
STALE_AFTER_S = 600.0


@contextlib.contextmanager
def beating(beat: Callable[[], None], name: str, interval: float | None = None) -> Iterator[None]:
    """Call ``beat`` now and every ``interval`` seconds (default :data:`INTERVAL_S`) in a
    daemon thread while the block runs; a failing beat is skipped, the next one retries."""
    interval = INTERVAL_S if interval is None else interval
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                beat()
            except Exception as exc:  # the next beat retries; training goes on
                log.debug("heartbeat %s not written: %s", name, exc)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=loop, name=f"heartbeat-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2.0)  # a daemon: a beat stuck on a dead server must not hold us


def now_tag() -> str:
    """The beat's value: this host's Unix time in whole seconds."""
    return f"{time.time():.0f}"


def last_beat(tags: dict[str, str]) -> float | None:
    """Unix time of the run's last beat; None when it never beat (runs of older versions)."""
    try:
        return float(tags[TAG])
    except (KeyError, ValueError):
        return None


def silent_for(tags: dict[str, str], now: float | None = None) -> float | None:
    """Seconds since the run's last beat; None when it never beat."""
    last = last_beat(tags)
    return None if last is None else (time.time() if now is None else now) - last
