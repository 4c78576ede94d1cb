"""Whether a tracking URI can be used, checked in about a second before anything is written.

Why its own module: the run's pre-flight (:mod:`running.preflight`) and the light commands
(`report`, `replay-metrics`) ask the same question, and the light ones must not import torch,
which the pre-flight does. `report` against a server that is down used to hang (urllib3's
retries, killed at 120 s with nothing printed); a run answered in 3 s.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

SQLITE_MAGIC = b"SQLite format 3\x00"


class TrackingURIError(ValueError):
    """A tracking URI that cannot be used; the message names it and the fix (the CLI prints
    it as its one error line, exit 2)."""


def check_tracking(uri: str, timeout_s: float = 3.0) -> None:
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            return  # something answered; MLflow calls will tell what is wrong
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            raise TrackingURIError(
                f"tracking server {uri} is not reachable ({reason}). Start it with "
                f"`mlflow server --host {parsed.hostname} --port {port}`, or log to a local "
                "file with `--tracking-uri sqlite:///mlflow.db`"
            ) from None
    elif parsed.scheme == "sqlite":
        raw = uri[len("sqlite:///"):]
        if not raw or raw == ":memory:":
            return
        db = Path(raw).expanduser()
        if not db.parent.is_dir():
            raise TrackingURIError(
                f"tracking URI {uri}: folder {db.parent} does not exist; create it "
                f"(`mkdir -p {db.parent}`) or use `--tracking-uri sqlite:///mlflow.db`"
            )
        if db.is_file() and db.stat().st_size > 0:
            with db.open("rb") as fh:
                head = fh.read(16)
            if head != SQLITE_MAGIC:
                raise TrackingURIError(
                    f"tracking URI {uri}: {db} is not an SQLite database; point "
                    "`--tracking-uri` at an MLflow SQLite file or a new path"
                )
