"""A real ``mlflow server`` for multi-worker runs, so workers never race on one SQLite file.

Why: several processes writing one SQLite file through SQLAlchemy hit ``database is locked``
under load and can lose runs. With more than one worker the driver therefore either uses the
user's ``http(s)://`` tracking server as-is, or starts ``mlflow server`` on 127.0.0.1 in front of
the local SQLite store; workers log over HTTP and the server serialises the writes.

Artifacts: the server is started with ``--artifacts-destination`` (a folder next to the DB, the
same ``mlartifacts/`` that serial runs use) and proxies artifact uploads. Experiments created by
an earlier serial run keep their ``file://`` artifact location; workers then write artifacts
straight to that folder, which is fine because the server only runs on this host.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from metalr_bench.benchmark.tracking.client import artifact_root_for


class TrackingServerError(RuntimeError):
    """The tracking server could not be started or reached; the message says what to do."""


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`TrackingServerError` unless ``<uri>/health`` answers."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status == 200:
                return
            raise TrackingServerError(f"MLflow server {uri} answered {resp.status} on /health")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingServerError(
            f"cannot reach the MLflow tracking server at {uri} ({exc}). Start it (e.g. "
            "`mlflow server --backend-store-uri sqlite:///mlflow.db --host 0.0.0.0 --port 5000`) "
            "or pass a local `--tracking-uri sqlite:///mlflow.db` and the benchmark starts one."
        ) from None


def _wait_healthy(uri: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrackingServerError(
                f"`mlflow server` exited with code {proc.returncode} before answering; "
                f"its log: {log_path}\n{_tail(log_path)}"
            )
        try:
            check_reachable(uri, timeout_s=1.0)
            return
        except TrackingServerError:
            time.sleep(0.25)
    raise TrackingServerError(
        f"`mlflow server` did not answer on {uri}/health within {timeout_s:.0f} s; "
        f"its log: {log_path}\n{_tail(log_path)}"
    )


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _mlflow_executable() -> list[str]:
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent) + os.pathsep
                       + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "mlflow"]


@contextmanager
def local_server(backend_uri: str, *, host: str = "127.0.0.1", port: int | None = None,
                 timeout_s: float = 90.0):
    """Run ``mlflow server`` over ``backend_uri`` (a ``sqlite:///`` URI); yield its http URI.

    The server is stopped on exit, also on Ctrl-C or an exception. Its log goes next to the DB
    (``mlflow-server.log``) so a failed start can be diagnosed.
    """
    if urlparse(backend_uri).scheme != "sqlite":
        raise TrackingServerError(
            f"can only start a local server over a sqlite:/// store, got {backend_uri!r}; "
            "pass an http(s):// --tracking-uri of a running server instead"
        )
    db = Path(backend_uri[len("sqlite:///"):]).expanduser().resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    artifacts = Path(urlparse(artifact_root_for(backend_uri) or "").path)
    artifacts.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    uri = f"http://{host}:{port}"
    log_path = db.parent / "mlflow-server.log"
    cmd = [*_mlflow_executable(), "server", "--backend-store-uri", f"sqlite:///{db}",
           "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port),
           "--workers", "1"]
    # MLflow 3 also starts a job runner and seven huey consumers (about 240 MB each, seconds of
    # CPU at start) for server-side jobs the suite never submits; on a small host they compete
    # with the workers this server is for
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # own group: stop uvicorn's children too
    try:
        _wait_healthy(uri, proc, timeout_s, log_path)
        yield uri
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Terminate the server's process group (the server and its workers), then kill if needed."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


@contextmanager
def tracking_for_workers(uri: str, n_workers: int):
    """The URI workers should log to: ``uri`` itself when serial, else an HTTP server's URI."""
    if n_workers <= 1 and not is_remote(uri):
        yield uri
    elif is_remote(uri):
        check_reachable(uri)
        yield uri
    elif urlparse(uri).scheme == "sqlite":
        with local_server(uri) as server_uri:
            yield server_uri
    else:
        raise TrackingServerError(
            f"tracking_uri={uri!r}: with several workers use a sqlite:/// store (a local "
            "`mlflow server` is started for you) or an http(s):// tracking server"
        )
