"""What can go wrong while a grid runs, and how each fault is turned into something useful.

* A diverging run (NaN/inf loss) raises :class:`DivergenceError`: the cell is marked FAILED with
  a ``failure_reason`` tag and the grid goes on. The check reads the epoch's accumulated loss,
  which the trainer syncs once per epoch anyway, so the hot loop gains no ``.item()``.
* A CUDA out-of-memory error becomes :class:`OutOfMemory` whose message names the batch size to
  try next, instead of a 40-line allocator dump.

A tracking server that goes away is the tracking layer's fault to handle
(:mod:`metalr_bench.benchmark.tracking.retry`).

Fault injection, for the reliability tests and for anyone who wants to see resume work:
``METALR_BENCH_KILL_AT=<epoch>:<batch>`` makes the trainer ``kill -9`` its own process right
after that batch of that epoch (0-based epoch, 1-based batch count), i.e. in the middle of an
epoch at a known point, not after a sleep that races the machine's speed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from collections.abc import Iterator

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; training this cell further is pointless."""


class OutOfMemory(RuntimeError):
    """Out of GPU memory, with the batch size to try next in the message."""


def check_finite(epoch: int, values: dict[str, float]) -> None:
    """Raise :class:`DivergenceError` when a loss in ``values`` is NaN or infinite."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise DivergenceError(
            f"training diverged at epoch {epoch} ({what}); lower `lr`, or check the strategy's "
            "parameters; the other runs of the grid go on"
        )


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def oom_message(batch_size: int, device: str) -> str:
    half = max(batch_size // 2, 2)
    return (
        f"out of memory on {device} with batch_size={batch_size}. Try `--batch-size {half}` "
        "(or `--amp bf16`, a smaller `--image-size` or a smaller `--model`)"
    )


@contextlib.contextmanager
def explain_oom(batch_size: int, device: str) -> Iterator[None]:
    """Turn an out-of-memory error into :class:`OutOfMemory` and free the allocator's cache."""
    try:
        yield
    except Exception as exc:
        if not is_oom(exc):
            raise
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemory(oom_message(batch_size, device)) from exc


KILL_AT_ENV = "METALR_BENCH_KILL_AT"


def kill_point() -> tuple[int, int] | None:
    """``(epoch, batch)`` of ``$METALR_BENCH_KILL_AT`` (``"1:2"``), None when unset."""
    raw = os.environ.get(KILL_AT_ENV)
    if not raw:
        return None
    epoch, _, batch = raw.partition(":")
    return int(epoch), int(batch or 1)


def kill_now() -> None:
    """SIGKILL this process: nothing runs after it (no finally, no atexit), like a crash."""
    log.warning("%s reached: kill -9 of pid %d", KILL_AT_ENV, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)
