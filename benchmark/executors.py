"""Where grid cells run: in this process, in local worker processes, or as Ray tasks.

Why one small protocol: the unit of work stays :func:`runner.run_cell` (so resume, fault
handling and tracking behave the same everywhere); an executor only decides *where* each call
happens and hands back plain picklable :class:`CellResult` objects.

- ``serial``: the historical loop, one cell after the other in the driver.
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
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from metalr_bench.benchmark.config import BenchmarkConfig, Cell, ConfigError
from metalr_bench.benchmark.tracking_server import tracking_for_workers
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from metalr_bench.benchmark.runner import CellResult, DataCache
    from metalr_bench.benchmark.tracking import Tracker

log = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs :func:`runner.run_cell` for many cells; results come back in ``cells`` order."""

    name: str
    n_workers: int

    def tracking(self, uri: str) -> AbstractContextManager[str]:
        """The tracking URI driver and workers use while the grid runs (may start a server)."""
        ...

    def map_cells(
        self, cfg: BenchmarkConfig, cells: list[Cell], parent_id: str, tracking_uri: str, *,
        tracker: Tracker, data: DataCache, progress: bool = True,
    ) -> list[CellResult]: ...


def _bar(total: int, progress: bool, desc: str = "benchmark") -> tqdm:
    return tqdm(total=total, desc=desc, unit="run", disable=not progress)


def _cell_name(cell: Cell) -> str:
    return f"{cell.dataset.name} {cell.label} seed={cell.seed}"


def _failed(cfg: BenchmarkConfig, cell: Cell, exc: BaseException) -> CellResult:
    """A cell whose worker died (crash, OOM kill, lost node): reported, never silently dropped."""
    from metalr_bench.benchmark.runner import CellResult

    return CellResult(cell, "", cfg.config_hash(cell), "FAILED",
                      error=f"worker failed: {type(exc).__name__}: {exc}")


# -- serial -----------------------------------------------------------------------------------------
class SerialExecutor:
    name = "serial"
    n_workers = 1

    def tracking(self, uri: str) -> AbstractContextManager[str]:
        return tracking_for_workers(uri, 1)

    def map_cells(self, cfg, cells, parent_id, tracking_uri, *, tracker, data, progress=True):
        from metalr_bench.benchmark.runner import run_cell

        results = []
        bar = tqdm(cells, desc="benchmark", unit="run", disable=not progress)
        for cell in bar:
            bar.set_postfix_str(_cell_name(cell))
            results.append(run_cell(cfg, cell, tracker, parent_id, data))
        return results


# -- worker side (local processes and Ray tasks) ----------------------------------------------------
_WORKER_STATE: dict[str, Any] = {}


def run_cell_in_worker(
    cfg: BenchmarkConfig, cell: Cell, parent_id: str, tracking_uri: str
) -> CellResult:
    """One cell in a worker: a per-process Tracker and DataCache, reused across its cells."""
    from metalr_bench.benchmark.runner import DataCache, run_cell
    from metalr_bench.benchmark.tracking import Tracker

    key = f"{tracking_uri}\0{cfg.name}"
    if _WORKER_STATE.get("key") != key:
        _WORKER_STATE.update(key=key, tracker=Tracker(tracking_uri, cfg.name), data=DataCache())
    if _WORKER_STATE.get("gpu_pinned") and cfg.device.startswith("cuda:"):
        cfg = cfg.model_copy(update={"device": "cuda"})  # the one GPU this worker sees
    return run_cell(cfg, cell, _WORKER_STATE["tracker"], parent_id, _WORKER_STATE["data"])


def _init_local_worker(gpu_queue: Any, threads: int) -> None:
    """ProcessPool initializer: pin this worker to one GPU (if any) before CUDA initialises."""
    gpu = gpu_queue.get() if gpu_queue is not None else None
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        _WORKER_STATE["gpu_pinned"] = True
    import torch

    torch.set_num_threads(max(1, threads))


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else all CUDA devices."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _uses_gpu(cfg: BenchmarkConfig) -> bool:
    return cfg.device.startswith("cuda") or (cfg.device == "auto" and bool(visible_gpus()))


# -- local process pool ---------------------------------------------------------------------------
class LocalExecutor:
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

    def map_cells(self, cfg, cells, parent_id, tracking_uri, *, tracker, data, progress=True):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")
        n = min(self.n_workers, len(cells)) or 1
        queue = None
        if self.gpus:
            queue = ctx.Manager().Queue()
            for i in range(n):  # round-robin: several workers per GPU when gpus_per_run < 1
                queue.put(self.gpus[i % len(self.gpus)])
        results: dict[int, CellResult] = {}
        pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_local_worker,
                                   initargs=(queue, self.threads))
        try:
            futures = {pool.submit(run_cell_in_worker, cfg, c, parent_id, tracking_uri): i
                       for i, c in enumerate(cells)}
            with _bar(len(cells), progress) as bar:
                for fut in as_completed(futures):
                    i = futures[fut]
                    try:
                        results[i] = fut.result()
                    except Exception as exc:  # noqa: BLE001 - a dead worker fails its cell only
                        log.error("cell %s: worker failed\n%s", _cell_name(cells[i]),
                                  "".join(traceback.format_exception(exc)))
                        results[i] = _failed(cfg, cells[i], exc)
                    bar.set_postfix_str(_cell_name(cells[i]))
                    bar.update()
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return [results[i] for i in range(len(cells))]


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


class RayExecutor:
    """One Ray task per cell on an existing cluster (``ray_address``) or a local Ray."""

    name = "ray"

    def __init__(self, cfg: BenchmarkConfig, cpus_per_run: float = 1.0) -> None:
        self.ray = import_ray()
        self.address = cfg.ray_address
        self.cpus_per_run = cpus_per_run
        self.n_workers = 2  # > 1: workers always log through a tracking server
        self._started = False

    def tracking(self, uri: str) -> AbstractContextManager[str]:
        return tracking_for_workers(uri, self.n_workers)

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

    def map_cells(self, cfg, cells, parent_id, tracking_uri, *, tracker, data, progress=True):
        ray = self.ray
        self._ensure_ray()
        try:
            self._check_reachable_from_cluster(tracking_uri)
            task = ray.remote(num_gpus=self._num_gpus(cfg), num_cpus=self.cpus_per_run,
                              max_retries=0)(run_cell_in_worker)
            refs = {task.remote(cfg, c, parent_id, tracking_uri): i for i, c in enumerate(cells)}
            results: dict[int, CellResult] = {}
            pending = list(refs)
            try:
                with _bar(len(cells), progress) as bar:
                    while pending:
                        done, pending = ray.wait(pending, num_returns=1)
                        for ref in done:
                            i = refs[ref]
                            try:
                                results[i] = ray.get(ref)
                            except Exception as exc:  # noqa: BLE001 - task/worker/node failure
                                log.error("cell %s: Ray task failed: %s", _cell_name(cells[i]), exc)
                                results[i] = _failed(cfg, cells[i], exc)
                            bar.set_postfix_str(_cell_name(cells[i]))
                            bar.update()
            except KeyboardInterrupt:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
            return [results[i] for i in range(len(cells))]
        finally:
            if self._started:
                ray.shutdown()
                self._started = False


EXECUTORS: dict[str, Callable[[BenchmarkConfig], Executor]] = {
    "serial": lambda cfg: SerialExecutor(),
    "local": LocalExecutor,
    "ray": RayExecutor,
}


def get_executor(cfg: BenchmarkConfig) -> Executor:
    return EXECUTORS[cfg.executor](cfg)

