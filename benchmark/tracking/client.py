"""MLflow tracking: one experiment per benchmark, a parent run per call, a child run per cell.

Why :class:`mlflow.MlflowClient` and explicit run ids instead of ``mlflow.start_run``: the
fluent API keeps one global "active run" per process, which breaks as soon as cells run in
worker threads or processes (executors) or a pre-training run nests inside a benchmark run.
Metrics are buffered and written with ``log_batch`` (one request per epoch, not one per value).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from metalr_bench.benchmark.tracking import heartbeat
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.benchmark.tracking.liveness import owner_tags
from metalr_bench.benchmark.tracking.retry import (
    RetryPolicy,
    TrackingError,
    describe_metrics,
    retry_call,
    save_unlogged,
)
from metalr_bench.benchmark.tracking.source import source_tags
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

_MAX_METRICS = 1000  # MLflow's per-request limits
_MAX_PARAMS = 100
_MAX_PARAM_LEN = 6000
log = logging.getLogger(__name__)


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/path/mlflow.db``.

    A relative SQLite path means "relative to the current folder"; anything that runs elsewhere
    (the report's kernel, a worker with another cwd) must get the absolute one or it silently
    opens a new, empty store.
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).expanduser().resolve())
    return uri


def artifact_root_for(uri: str) -> str | None:
    """Artifacts next to a SQLite DB (``mlartifacts/``), so ``mlflow ui`` finds them."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None  # a server decides (`--artifacts-destination`)
    db = Path(uri[len("sqlite:///"):]).expanduser()
    return (db.resolve().parent / "mlartifacts").as_uri()


class Tracker:
    """Thin layer over :class:`MlflowClient` for the benchmark's run structure."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        retry: RetryPolicy | None = None,
        fallback_dir: str | Path | None = None,
    ) -> None:
        if urlparse(tracking_uri).scheme in ("http", "https"):
            # our RetryPolicy (``tracking_retry_s``) owns retrying an unreachable server; MLflow's
            # own HTTP retries (7, backoff up to minutes per call) would hide it behind minutes of
            # silence. A user's explicit setting wins.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            # MLflow writes "🏃 View run … at: http://…" and "🧪 View experiment at" to stdout for
            # every run it ends over HTTP: two lines per run and trial, amid the results on
            # stdout; the summary prints the experiment's address once (README, MLflow UI)
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.retry = retry or RetryPolicy()
        #: where metrics go that MLflow would not take (see faults.save_unlogged)
        self.fallback_dir = Path(fallback_dir) if fallback_dir else Path("unlogged-metrics")
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = self.client.create_experiment(
                experiment, artifact_location=artifact_root_for(tracking_uri)
            )
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self.experiment_name = experiment

    # -- runs -------------------------------------------------------------------------------------
    def start_run(
        self, name: str, tags: dict[str, Any] | None = None, parent_id: str | None = None
    ) -> str:
        """A new RUNNING run; prefer :meth:`run`, which also ends it and keeps it beating."""
        all_tags = {MLFLOW_RUN_NAME: name, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_id
        run = self._call(self.client.create_run, self.experiment_id, run_name=name,
                         tags=all_tags)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, run_id, status=status)

    def _end_quietly(self, run_id: str, status: str) -> None:
        try:
            self.end_run(run_id, status)
        except Exception as exc:
            log.error("could not mark run %s %s in MLflow (%s)", run_id, status, exc)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One MLflow call, retried with backoff while the server is unreachable."""
        return retry_call(fn, *args, policy=self.retry, what=getattr(fn, "__name__", ""),
                          **kwargs)

    def reopen_run(self, run_id: str, tags: dict[str, Any] | None = None) -> str:
        """Mark an ended run RUNNING again so a resumed cell (or study) keeps logging into it."""
        self._call(self.client.update_run, run_id, status="RUNNING")
        if tags:
            self.set_tags(run_id, tags)
        return run_id

    def search_runs(self, filter_string: str, *, order_by: list[str] | None = None,
                    max_results: int | None = None) -> list[Run]:
        """Live (not deleted) runs of this experiment matching ``filter_string``, every page."""
        runs: list[Run] = []
        token = None
        while True:
            page = self._call(
                self.client.search_runs, [self.experiment_id], filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY, order_by=order_by,
                max_results=min(max_results or 1000, 1000), page_token=token,
            )
            runs += list(page)
            token = page.token
            if not token or (max_results is not None and len(runs) >= max_results):
                return runs[:max_results] if max_results is not None else runs

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps of ``key`` the run already holds (a resumed run re-logs the others)."""
        return {m.step for m in self._call(self.client.get_metric_history, run_id, key)}

    def beat(self, run_id: str) -> None:
        """One heartbeat of ``run_id`` (see :mod:`.heartbeat`)."""
        self.client.set_tag(run_id, T.HEARTBEAT, heartbeat.now_tag())

    @contextmanager
    def system_metrics(self, run_id: str, interval_s: float | None, *,
                       resume: bool = False) -> Iterator[None]:
        """MLflow's own system-metrics logging for ``run_id`` while the block runs: CPU,
        memory, disk, network and (with ``nvidia-ml-py``, the ``gpu`` extra, on a CUDA host) GPU
        utilisation and memory, as ``system/...`` metrics every ``interval_s`` seconds (None:
        off). MLflow's ``SystemMetricsMonitor`` is driven for the run id directly, because the
        suite starts runs with the client, not ``mlflow.start_run(log_system_metrics=True)``
        (module docstring). ``resume``: a reopened run continues the steps it had.

        A monitor that cannot start (psutil missing) is a warning, never a failed run.
        """
        if interval_s is None:
            yield
            return
        monitor = None
        # MLflow's monitor says "Started/Stopped monitoring system metrics" and "Skip logging GPU
        # metrics" at INFO for every run: progress noise on stderr (and through --no-progress);
        # its warnings still print
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s,
                                           resume_logging=resume, tracking_uri=self.uri)
            monitor.start()
        except Exception as exc:  # noqa: BLE001 - observability must not fail a run
            log.warning("system metrics of run %s are not logged (%s: %s); install psutil",
                        run_id, type(exc).__name__, exc)
            monitor = None
        try:
            yield
        finally:
            if monitor is not None:
                monitor.finish()
                self._publish_last_samples(monitor)

    @staticmethod
    def _publish_last_samples(monitor: Any) -> None:
        """MLflow's monitor publishes only at the end of a full sampling interval and drops the
        samples of an interval cut short by ``finish()``: a run shorter than the interval (or
        whose monitor thread was starved on a loaded host) got no ``system/`` metric at all.
        Whatever it collected since its last publication is published here, once."""
        try:
            metrics = monitor.aggregate_metrics()
            if metrics:
                monitor.publish_metrics(metrics)
                monitor.mlflow_logger.flush()
        except Exception as exc:  # noqa: BLE001 - observability must not fail a run
            log.warning("the last system-metrics samples were not logged (%s: %s)",
                        type(exc).__name__, exc)

    @contextmanager
    def run(self, name: str, tags: dict[str, Any] | None = None, parent_id: str | None = None,
            *, reopen: str | None = None, beat: Callable[[str], None] | None = None,
            finished_on: tuple[type[BaseException], ...] = (),
            system_metrics: float | None = None) -> Iterator[str]:
        """The one run lifecycle: every run of the suite (benchmark parent, cell, study, trial,
        pre-training) goes through here.

        It starts the run (or ``reopen``s an existing one: resume) with ``tags`` plus who runs
        it (:func:`liveness.owner_tags`), keeps it beating in a background thread while the
        block runs (``beat(run_id)``, default :meth:`beat`), and ends it FINISHED, FAILED (an
        exception; its reason tagged as ``failure_reason``) or KILLED (Ctrl-C, SIGTERM). An
        exception in ``finished_on`` (a pruned trial) ends it FINISHED and is re-raised. A run
        whose process dies without a word (``kill -9``) keeps its owner tags and a stopped
        heartbeat, so the next call marks it KILLED (:func:`liveness.mark_stale_runs`).
        ``system_metrics``: the sampling interval (s) of MLflow's system metrics for this run
        (:meth:`system_metrics`), None for none (a benchmark's parent run, a study).
        """
        all_tags = {**source_tags(), **(tags or {}), **owner_tags()}
        if reopen:
            run_id = self.reopen_run(reopen, {**all_tags, **(
                {MLFLOW_PARENT_RUN_ID: parent_id} if parent_id else {})})
        else:
            run_id = self.start_run(name, all_tags, parent_id)
        try:
            with heartbeat.beating(lambda: (beat or self.beat)(run_id), run_id[:8]), \
                    self.system_metrics(run_id, system_metrics, resume=reopen is not None):
                yield run_id
        except KeyboardInterrupt:
            self._end_quietly(run_id, "KILLED")
            raise
        except finished_on:
            self.end_run(run_id, "FINISHED")
            raise
        except TrackingError:  # the server is away: the run cannot be ended now; it keeps its
            raise  # owner tags, so the next call marks it KILLED and resumes the cell
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"[:5000]
            try:
                self.set_tags(run_id, {T.ERROR: reason, T.FAILURE_REASON: reason})
            except Exception:  # the server may be what failed; keep the original error
                log.warning("could not tag run %s with its failure reason", run_id)
            self._end_quietly(run_id, "FAILED")
            raise
        else:
            self.end_run(run_id, "FINISHED")

    # -- data -------------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(items), _MAX_PARAMS):
            self._call(self.client.log_batch, run_id, params=items[i : i + _MAX_PARAMS])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_PARAMS):
            self._call(self.client.log_batch, run_id, tags=items[i : i + _MAX_PARAMS])

    def log_metrics(
        self, run_id: str, metrics: dict[str, float], step: int = 0, timestamp: int | None = None
    ) -> None:
        ts = timestamp or int(time.time() * 1000)
        self.log_metric_batch(run_id, [Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_batch(self, run_id: str, *, params: dict[str, Any] | None = None,
                  tags: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                  step: int = 0) -> None:
        """Params, tags and metrics in as few MLflow requests as its limits allow (one, for a
        trial's closing numbers): each request is a round trip and, on a SQLite store, a
        transaction, which a short trial pays several times over (issue 38's profile)."""
        ts = int(time.time() * 1000)
        p = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in flatten(params or {}).items()]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        m = [Metric(k, float(v), ts, step) for k, v in (metrics or {}).items()]
        while p or t or m:
            self._call(self.client.log_batch, run_id, params=p[:_MAX_PARAMS],
                       tags=t[:_MAX_PARAMS], metrics=m[:_MAX_METRICS])
            p, t, m = p[_MAX_PARAMS:], t[_MAX_PARAMS:], m[_MAX_METRICS:]

    def log_metric_batch(self, run_id: str, metrics: Iterable[Metric]) -> None:
        items = list(metrics)
        for i in range(0, len(items), _MAX_METRICS):
            self._call(self.client.log_batch, run_id, metrics=items[i : i + _MAX_METRICS])

    def log_inputs(self, run_id: str, inputs: list[Any], *, attempts: int = 4) -> None:
        """Datasets as run inputs (:mod:`.datasets`), shown in the MLflow UI's dataset column.

        Two workers logging the same dataset at once race in the store's get-or-create of the
        dataset row: the loser gets "UNIQUE constraint failed: datasets..." (seen with two local
        workers through one `mlflow server`). A retry then finds the winner's row, so that
        error is retried a few times; if it persists the inputs are left out with a warning (a
        run never fails over its dataset column). Any other error propagates as usual."""
        if not inputs:
            return
        for attempt in range(attempts):
            try:
                self._call(self.client.log_inputs, run_id, datasets=inputs)
                return
            except MlflowException as exc:
                if "UNIQUE constraint failed" not in str(exc):
                    raise
                if attempt == attempts - 1:
                    log.warning("run %s: its dataset inputs were not logged (the store kept "
                                "refusing a dataset another run created at the same time: %s)",
                                run_id, str(exc).splitlines()[0])
                    return
                time.sleep(0.1 * (attempt + 1))

    def log_dict(self, run_id: str, data: dict[str, Any], path: str) -> None:
        self._call(self.client.log_dict, run_id, data, path)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self._call(self.client.log_text, run_id, text, path)

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None):
        self._call(self.client.log_artifact, run_id, str(local_path), artifact_path)

    def log_table(self, run_id: str, columns: dict[str, list[Any]], path: str) -> None:
        """A table as a CSV artifact (``columns``: name -> values, all the same length)."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values(), strict=True))
        self.log_text(run_id, out.getvalue(), path)

    def log_figure(self, run_id: str, figure: Any, path: str) -> None:
        self._call(self.client.log_figure, run_id, figure, path)


class MetricsLogger:
    """A trainer callback (``training.trainer.TrainerCallback``'s three methods; tracking does not
    import the trainer, so reports can read MLflow without torch): buffers per-epoch and per-step numbers, one ``log_batch`` per epoch."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self._buffer: list[Metric] = []

    def on_log_step(self, step: int, values: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        self._buffer += [Metric(f"step/{k}", float(v), ts, step) for k, v in values.items()]

    def on_step_values(self, step: int, values: dict[str, float]) -> None:
        """A strategy's per-training-step values, each under its own key (no ``step/`` prefix:
        they are not the epoch values sampled every n steps), MLflow step = training step."""
        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), ts, step) for k, v in values.items()]

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), ts, epoch) for k, v in metrics.items()]
        try:
            self.flush()
        except TrackingError as exc:  # keep training; the buffer is retried next epoch
            log.warning("%s; will retry after the next epoch", exc)

    def flush(self, *, final: bool = False) -> None:
        """Send the buffer (retried with backoff). On failure the metrics stay buffered and
        :class:`TrackingError` is raised; with ``final`` they are also saved to a JSONL file."""
        if not self._buffer:
            return
        try:
            self.tracker.log_metric_batch(self.run_id, self._buffer)
        except Exception as exc:
            pending = list(self._buffer)
            where = ""
            if final:
                path = save_unlogged(self.tracker.fallback_dir / f"{self.run_id}.jsonl",
                                     self.run_id, pending)
                self._buffer = []
                where = f"; they were saved to {path} (replay them with " \
                        f"`run-benchmark replay-metrics {path}` once the server is back)"
            raise TrackingError(
                f"tracking server {self.tracker.uri} unreachable ({type(exc).__name__}: {exc}); "
                f"{len(pending)} metric(s) of run {self.run_id} not logged: "
                f"{describe_metrics(pending)}{where}"
            ) from exc
        self._buffer = []


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else v
    return out
