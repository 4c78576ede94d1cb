"""Where grid cells run: in this process, in local worker processes, or as Ray tasks.

Why one small protocol: the units of work stay the runner's cell function and the tuning
stage's study worker (so resume, fault handling and tracking behave the same everywhere); an
executor only decides *where* each call happens (``map_calls``) and hands back plain picklable
results, or the exception of a call whose worker died. The caller hands the unit of work in (a
module-level function, so workers can unpickle it); executors never import the runner.

- ``serial``: one call after the other in the driver.
- ``local``: a ``spawn`` process pool on this host. With CUDA: one worker per visible GPU
  (``CUDA_VISIBLE_DEVICES`` pinned per worker; ``gpus_per_run: 0.25`` packs 4 workers per GPU),
  without: ``workers`` CPU workers sharing the cores.
- ``ray``: one Ray task per cell with ``num_gpus=gpus_per_run`` on an existing cluster
  (``ray_address: auto``) or a local one; Ray pins ``CUDA_VISIBLE_DEVICES`` itself.

With more than one worker, nobody writes the SQLite file directly: the driver starts (or uses)
an ``mlflow server`` (:mod:`tracking_server`) and driver and workers log over HTTP.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol
from urllib.parse import urlparse

from metalr_bench.benchmark.config import BenchmarkConfig, Cell, ConfigError
from metalr_bench.benchmark.tracking.client import Tracker
from metalr_bench.benchmark.tracking.server import tracking_for_workers
from metalr_bench.benchmark.training.cell import CellResult, DataCache
from metalr_bench.benchmark.warning_lines import warnings_as_lines
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs calls (grid cells, tuning workers) somewhere; results come back in input order."""

    name: str
    n_workers: int

    def tracking(self, uri: str) -> AbstractContextManager[str]:
        """The tracking URI driver and workers use while the grid runs (may start a server)."""
        ...

    def map_calls(
        self, fn: WorkerFn, cfg: BenchmarkConfig, tracking_uri: str, calls: list[tuple],
        *, labels: list[str], bar: tqdm, count: Callable[[], int] | None = None,
        driver: tuple[Tracker, DataCache] | None = None,
    ) -> list[Any]: ...

    def map_cells(
        self, fn: WorkerFn, cfg: BenchmarkConfig, cells: list[Cell], parent_id: str,
        tracking_uri: str, *, tracker: Tracker, data: DataCache, progress: bool = True,
    ) -> list[CellResult]: ...


#: a unit of work: ``fn(cfg, tracker, data, *call)``; module-level, so workers can unpickle it
WorkerFn = Callable[..., Any]


def _cell_name(cell: Cell) -> str:
    return f"{cell.dataset.dataset_key} {cell.strategy_label} seed={cell.seed}"


def _failed(cfg: BenchmarkConfig, cell: Cell, exc: BaseException) -> CellResult:
    """A cell whose worker died (crash, OOM kill, lost node): reported, never silently dropped."""
    return CellResult(cell, "", cfg.config_hash(cell), "FAILED",
                      error=f"worker failed: {type(exc).__name__}: {exc}")


def map_cells(executor: Executor, fn: WorkerFn, cfg: BenchmarkConfig, cells: list[Cell],
              parent_id: str, tracking_uri: str, *, tracker: Tracker, data: DataCache,
              progress: bool = True) -> list[CellResult]:
    """Every grid cell through ``executor`` as ``fn(cfg, tracker, data, cell, parent_id)``; a
    cell whose worker died comes back FAILED."""
    with tqdm(total=len(cells), desc="benchmark", unit="run", disable=not progress) as bar:
        out = executor.map_calls(fn, cfg, tracking_uri, [(c, parent_id) for c in cells],
                                 labels=[_cell_name(c) for c in cells], bar=bar,
                                 driver=(tracker, data))
    return [_failed(cfg, c, r) if isinstance(r, BaseException) else r
            for c, r in zip(cells, out, strict=True)]


class _MapCells:
    def map_cells(self, fn, cfg, cells, parent_id, tracking_uri, *, tracker, data,
                  progress=True):
        return map_cells(self, fn, cfg, cells, parent_id, tracking_uri, tracker=tracker,
                         data=data, progress=progress)


def _tick(bar: tqdm, count: Callable[[], int] | None, label: str | None = None) -> None:
    """Advance the bar: by the driver's own count (e.g. finished trials) or by one call."""
    if label is not None:
        bar.set_postfix_str(label)
    if count is not None:
        bar.n = count()
        bar.refresh()
    elif label is not None:
        bar.update()


# -- serial -----------------------------------------------------------------------------------------
class SerialExecutor(_MapCells):
    """In this process, with the driver's tracker and data (no server, no pickling)."""

    name = "serial"
    n_workers = 1

    def tracking(self, uri: str) -> AbstractContextManager[str]:
        return tracking_for_workers(uri, 1)

    def map_calls(self, fn, cfg, tracking_uri, calls, *, labels, bar, count=None, driver=None):
        tracker, data = driver if driver is not None else _worker_context(cfg, tracking_uri)
        results: list[Any] = []
        for call, label in zip(calls, labels, strict=True):
            bar.set_postfix_str(label)
            results.append(fn(cfg, tracker, data, *call))
            _tick(bar, count, label)
        return results


# -- worker side (local processes and Ray tasks) ----------------------------------------------------
_WORKER_STATE: dict[str, Any] = {}


def _worker_context(cfg: BenchmarkConfig, tracking_uri: str) -> tuple[Tracker, DataCache]:
    """A per-process Tracker and DataCache, reused across the calls a worker runs."""
    key = f"{tracking_uri}\0{cfg.name}"
    if _WORKER_STATE.get("key") != key:
        _WORKER_STATE.update(key=key, tracker=Tracker(tracking_uri, cfg.name), data=DataCache())
    return _WORKER_STATE["tracker"], _WORKER_STATE["data"]


def call_in_worker(fn: WorkerFn, cfg: BenchmarkConfig, tracking_uri: str, *call: Any) -> Any:
    """One call in a worker process or Ray task: ``fn(cfg, tracker, data, *call)``.

    The suite's warnings print as the driver's do (one line naming the input,
    :mod:`warning_lines`), not in Python's raw ``file:line: Warning`` format.
    """
    with warnings_as_lines():
        tracker, data = _worker_context(cfg, tracking_uri)
        if _WORKER_STATE.get("gpu_pinned") and cfg.device.startswith("cuda:"):
            cfg = cfg.model_copy(update={"device": "cuda"})  # the one GPU this worker sees
        return fn(cfg, tracker, data, *call)


#: ``module:function`` every local worker calls once at start, after its threads are set: how
#: ``perf.profile_trial --workers N`` times the phases inside the workers. Unset: nothing runs.
WORKER_INIT_ENV = "METALR_BENCH_WORKER_INIT"


def _init_local_worker(gpu_queue: Any, threads: int) -> None:
    """ProcessPool initializer: pin this worker to one GPU (if any) before CUDA initialises."""
    gpu = gpu_queue.get() if gpu_queue is not None else None
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        _WORKER_STATE["gpu_pinned"] = True
    import torch

    torch.set_num_threads(max(1, threads))
    hook = os.environ.get(WORKER_INIT_ENV)
    if hook:
        import importlib

        module, _, name = hook.partition(":")
        getattr(importlib.import_module(module), name)()


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else all CUDA devices."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _uses_gpu(cfg: BenchmarkConfig) -> bool:
    return cfg.device.startswith("cuda") or (cfg.device == "auto" and bool(visible_gpus()))


def _log_failure(label: str, exc: BaseException) -> None:
    log.error("%s: worker failed\n%s", label, "".join(traceback.format_exception(exc)))


#: how often the driver refreshes a bar that counts something else than calls (seconds)
POLL_S = 2.0


# -- local process pool ---------------------------------------------------------------------------
class LocalExecutor(_MapCells):
    """A ``spawn`` process pool on this host (``fork`` is unsafe with CUDA and MLflow threads)."""

    name = "local"

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.gpus = visible_gpus() if _uses_gpu(cfg) else []
        if self.gpus:
            per_gpu = max(1, int(1 / cfg.gpus_per_run)) if cfg.gpus_per_run < 1 else 1
            self.n_workers = cfg.workers or len(self.gpus) * per_gpu
        else:
            self.n_workers = cfg.workers or max(1, (os.cpu_count() or 2) // 2)
        self.threads = max(1, (os.cpu_count() or 1) // self.n_workers)

    def tracking(self, uri: str) -> AbstractContextManager[str]:
        return tracking_for_workers(uri, self.n_workers)

    def map_calls(self, fn, cfg, tracking_uri, calls, *, labels, bar, count=None, driver=None):
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = mp.get_context("spawn")
        n = min(self.n_workers, len(calls)) or 1
        queue = None
        if self.gpus:
            queue = ctx.Manager().Queue()
            for i in range(n):  # round-robin: several workers per GPU when gpus_per_run < 1
                queue.put(self.gpus[i % len(self.gpus)])
        results: dict[int, Any] = {}
        pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_local_worker,
                                   initargs=(queue, self.threads))
        try:
            futures = {pool.submit(call_in_worker, fn, cfg, tracking_uri, *call): i
                       for i, call in enumerate(calls)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=POLL_S if count else None,
                                     return_when=FIRST_COMPLETED)
                for fut in done:
                    i = futures[fut]
                    try:
                        results[i] = fut.result()
                    except Exception as exc:  # noqa: BLE001 - a dead worker fails its call only
                        _log_failure(labels[i], exc)
                        results[i] = exc
                    _tick(bar, count, labels[i])
                if not done:
                    _tick(bar, count)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return [results[i] for i in range(len(calls))]


# -- Ray --------------------------------------------------------------------------------------------
def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "executor=ray needs Ray: `pip install 'metalr-bench[ray]'` (or `pip install "
            "'ray[default]'`), or use `--executor local`"
        ) from None
    return ray


class RayExecutor(_MapCells):
    """One Ray task per cell on an existing cluster (``ray_address``) or a local Ray."""

    name = "ray"

    def __init__(self, cfg: BenchmarkConfig, cpus_per_run: float = 1.0) -> None:
        self.ray = import_ray()
        self.address = cfg.ray_address
        self.cpus_per_run = cpus_per_run
        self.n_workers = 2  # > 1: workers always log through a tracking server
        self._started = False

    @contextmanager
    def tracking(self, uri: str) -> Iterator[str]:
        """The tracking server for the whole call; a Ray started here is shut down after it."""
        try:
            with tracking_for_workers(uri, self.n_workers) as worker_uri:
                yield worker_uri
        finally:
            if self._started:
                self.ray.shutdown()
                self._started = False

    def _ensure_ray(self) -> None:
        if not self.ray.is_initialized():
            self.ray.init(address=self.address, include_dashboard=False,
                          log_to_driver=True)
            self._started = True

    def _num_gpus(self, cfg: BenchmarkConfig) -> float:
        cluster_gpus = self.ray.cluster_resources().get("GPU", 0)
        if cfg.device == "cpu":
            return 0.0
        if cluster_gpus > 0:
            return cfg.gpus_per_run
        if cfg.device.startswith("cuda"):
            raise ConfigError(
                f"device={cfg.device!r} but the Ray cluster reports no GPUs; add GPU nodes or "
                "use `--device cpu`"
            )
        return 0.0

    def _check_reachable_from_cluster(self, uri: str) -> None:
        host = urlparse(uri).hostname
        alive = [n for n in self.ray.nodes() if n.get("Alive")]
        if host in ("127.0.0.1", "localhost") and len(alive) > 1:
            raise ConfigError(
                f"tracking URI {uri} is only reachable on this host but the Ray cluster has "
                f"{len(alive)} nodes; run `mlflow server --host 0.0.0.0 ...` somewhere all nodes "
                "reach and pass `--tracking-uri http://<host>:<port>`"
            )

    def map_calls(self, fn, cfg, tracking_uri, calls, *, labels, bar, count=None, driver=None):
        ray = self.ray
        self._ensure_ray()
        try:
            self._check_reachable_from_cluster(tracking_uri)
            task = ray.remote(num_gpus=self._num_gpus(cfg), num_cpus=self.cpus_per_run,
                              max_retries=0)(call_in_worker)
            refs = {task.remote(fn, cfg, tracking_uri, *call): i for i, call in enumerate(calls)}
            results: dict[int, Any] = {}
            pending = list(refs)
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1,
                                             timeout=POLL_S if count else None)
                    for ref in done:
                        i = refs[ref]
                        try:
                            results[i] = ray.get(ref)
                        except Exception as exc:  # noqa: BLE001 - task/worker/node failure
                            _log_failure(labels[i], exc)
                            results[i] = exc
                        _tick(bar, count, labels[i])
                    if not done:
                        _tick(bar, count)
            except KeyboardInterrupt:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
            return [results[i] for i in range(len(calls))]
        except BaseException:
            if self._started:  # an interrupted or broken call leaves no Ray behind
                ray.shutdown()
                self._started = False
            raise


EXECUTORS: dict[str, Callable[[BenchmarkConfig], Executor]] = {
    "serial": lambda cfg: SerialExecutor(),
    "local": LocalExecutor,
    "ray": RayExecutor,
}


def get_executor(cfg: BenchmarkConfig) -> Executor:
    return EXECUTORS[cfg.executor](cfg)

