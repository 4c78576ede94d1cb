"""A tracking server that goes away for a while must not lose a run's numbers.

Every MLflow call is retried with exponential backoff for a bounded time (:func:`retry_call`);
metrics that still could not be sent stay in the logger's buffer and are retried on the next
epoch. If they still cannot be sent when the run ends, they are written to a local JSONL file
(:func:`save_unlogged`) and :class:`TrackingError` says which metrics (name and step) are
missing from MLflow and where they were saved; ``run-benchmark replay-metrics`` sends them later
(:func:`replay_unlogged`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrackingError(RuntimeError):
    """The tracking server stayed unreachable; the message lists what was not logged."""

@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base_s``, ``2*base_s``, ... capped at ``max_delay_s``, for at most
    ``max_total_s`` seconds in all (0 disables retries)."""

    max_total_s: float = 60.0
    base_s: float = 0.5
    max_delay_s: float = 10.0


def _permanent(exc: BaseException) -> bool:
    """Errors that a retry cannot fix (a bad request), as opposed to an unreachable server."""
    code = getattr(exc, "error_code", None)
    return code in {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST",
                    "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "BAD_REQUEST"}


def retry_call(fn: Callable[..., T], *args: Any, policy: RetryPolicy, what: str = "",
               **kwargs: Any) -> T:
    """Call ``fn`` until it succeeds or ``policy.max_total_s`` is used up; then raise
    :class:`TrackingError` (a bad request, which no retry fixes, is re-raised at once)."""
    start = time.monotonic()
    delay = policy.base_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            elapsed = time.monotonic() - start
            if _permanent(exc) or isinstance(exc, TrackingError):
                raise
            if elapsed + delay > policy.max_total_s:
                raise TrackingError(
                    f"tracking server unreachable for {elapsed:.0f} s ({attempt} attempt(s) of "
                    f"{what or getattr(fn, '__name__', '?')}; last error "
                    f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
                ) from exc
            log.warning("tracking call %s failed (attempt %d: %s); retrying in %.1fs",
                        what or getattr(fn, "__name__", "?"), attempt, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, policy.max_delay_s)


def save_unlogged(path: Path, run_id: str, metrics: Sequence[Any]) -> Path:
    """Append metrics MLflow did not take to a JSONL file (one metric per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for m in metrics:
            fh.write(json.dumps({"run_id": run_id, "key": m.key, "value": m.value,
                                 "timestamp": m.timestamp, "step": m.step}) + "\n")
    return path


def describe_metrics(metrics: Sequence[Any], limit: int = 12) -> str:
    """``train_loss@0, val_auc@0, ... (+N more)``."""
    items = [f"{m.key}@{m.step}" for m in metrics]
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class UnloggedFileError(ValueError):
    """A fallback metrics file that is missing or not what :class:`MetricsLogger` writes."""


def read_unlogged(path: Path) -> dict[str, list[Any]]:
    """The metrics of a fallback JSONL file, by run id; a missing or malformed file is a
    :class:`UnloggedFileError` naming it and the line (the CLI prints one line, exit 2)."""
    from mlflow.entities import Metric

    fix = "pass a file from <output_dir>/unlogged-metrics/"
    if not path.is_file():
        raise UnloggedFileError(f"replay-metrics: {path} does not exist; {fix}")
    by_run: dict[str, list[Metric]] = {}
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                d = json.loads(line)
                by_run.setdefault(d["run_id"], []).append(
                    Metric(d["key"], d["value"], d["timestamp"], d["step"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise UnloggedFileError(f"replay-metrics: {path}:{i} is not a metric record of "
                                  f"run_id, key, value, timestamp, step ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())}); {fix}") from None
    return by_run


def replay_unlogged(path: Path, client: Any, by_run: dict[str, list[Any]] | None = None) -> int:
    """Send the metrics of a fallback JSONL file to MLflow (after the server is back);
    ``by_run``: the file already read (:func:`read_unlogged`)."""
    if by_run is None:
        by_run = read_unlogged(path)
    for run_id, items in by_run.items():
        for i in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[i : i + 1000])
    return sum(len(v) for v in by_run.values())
