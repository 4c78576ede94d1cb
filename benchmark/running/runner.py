"""Run the grid: a parent MLflow run per call, one child run per cell, a leaderboard at the end.

Data flows one way: config -> dataset + model -> strategy -> trainer -> tracker. The runner is
the only place that knows all of them; nothing below it talks to MLflow except through the
trainer's callbacks.
"""

from __future__ import annotations

import logging
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from metalr_bench.benchmark import __version__
from metalr_bench.benchmark.config import BenchmarkConfig, Cell, DatasetSpec
from metalr_bench.benchmark.running.executors import get_executor
from metalr_bench.benchmark.running.preflight import preflight
from metalr_bench.benchmark.running.resume import plan_cell
from metalr_bench.benchmark.running.signals import terminate_as_interrupt
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.benchmark.tracking.client import MetricsLogger, Tracker
from metalr_bench.benchmark.tracking.datasets import dataset_inputs
from metalr_bench.benchmark.tracking.liveness import mark_stale_runs
from metalr_bench.benchmark.tracking.retry import RetryPolicy, TrackingError
from metalr_bench.benchmark.training.cell import (
    CellResult,
    DataCache,
    strategy_tags,
    train_cell,
)
from metalr_bench.benchmark.training.checkpoint import CellCheckpoint
from metalr_bench.benchmark.training.export import save_selected
from metalr_bench.benchmark.training.faults import explain_oom
from metalr_bench.benchmark.training.pretrain import starting_weights
from metalr_bench.benchmark.training.transferability import run_transferability
from metalr_bench.benchmark.tuning.studies import tune_all
from metalr_bench.strategies.core.registry import get_strategy

log = logging.getLogger(__name__)


@dataclass
class BenchmarkOutcome:
    parent_run_id: str
    experiment_id: str
    results: list[CellResult]
    report: Any = None  # reports.build.ReportPaths when a report was built

    @staticmethod
    def _is_busy(r: CellResult) -> bool:
        """Left alone because another live process holds its RUNNING run: not a failure of
        this command, but missing from its leaderboard until that process finishes."""
        return r.status == "RUNNING" and r.skipped

    @property
    def busy(self) -> list[CellResult]:
        return [r for r in self.results if self._is_busy(r)]

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results if r.status != "FINISHED" and not self._is_busy(r)]


def dataset_tags(dataset: DatasetSpec) -> dict[str, Any]:
    """How a run names its dataset: display name, adapter, size, and its fold when it is one."""
    tags: dict[str, Any] = {T.DATASET: dataset.dataset_name, T.DATASET_ADAPTER: dataset.adapter,
                            T.IMAGE_SIZE: dataset.size}
    if dataset.fold is not None:
        tags |= {T.FOLD: dataset.fold, T.CV_GROUP: dataset.cv_group}
    return tags


def cell_tags(cfg: BenchmarkConfig, cell: Cell) -> dict[str, Any]:
    params = cfg.cell_params(cell)
    return {
        T.KIND: T.KIND_CELL,
        **dataset_tags(cell.dataset),
        T.STRATEGY: cell.strategy,
        T.STRATEGY_LABEL: cell.strategy_label,
        T.SEED: cell.seed,
        T.MODEL: cfg.model.arch,
        T.CONFIG_HASH: cfg.config_hash(cell),
        **{t: params[t] for t in (T.CODE_FINGERPRINT, T.CODE_FINGERPRINT_SHARED)},
        **({T.TUNED: "true", T.STUDY_NAME: cell.study} if cell.study else {}),
        **({T.TUNED_FROM: cell.tuned_from} if cell.tuned_from else {}),
    }


def run_cell(
    cfg: BenchmarkConfig,
    tracker: Tracker,
    data: DataCache,
    cell: Cell,
    parent_id: str,
    *,
    keep_weights: bool = False,
) -> CellResult:
    """Train one cell inside its own child run (resume, params, metrics, artifacts). The
    arguments are in an executor's order for a unit of work, ``fn(cfg, tracker, data, *call)``,
    so the executors call it directly. ``keep_weights``: keep its selected checkpoint on disk
    (:func:`export.save_selected`, the race's confirmation cells: the winner's model)."""
    cfg = cfg.effective(cell)
    h = cfg.config_hash(cell)
    bundle = data.get(cell)
    name = f"{cell.dataset.dataset_key}/{cell.strategy_label}/seed{cell.seed}"
    result = CellResult(cell, "", h, "RUNNING")
    ckpt = CellCheckpoint(Path(cfg.output_dir) / "checkpoints", h)
    plan = plan_cell(tracker, h, ckpt, force=cfg.force)
    if plan.action in ("skip", "busy"):
        busy = plan.action == "busy"
        return CellResult(cell, plan.run_id or "", h, "RUNNING" if busy else "FINISHED",
                          plan.summary, skipped=True,
                          error=plan.note if busy else None)
    try:
        # pre-trained (with its progress lines) by the driver before the first cell: cached here
        weights, source = starting_weights(cfg, bundle, tracker, parent_id, progress=False,
                                           dataset=cell.dataset)
        tags = cell_tags(cfg, cell)
        if plan.payload is not None:
            tags["resumed_from_epoch"] = plan.resume_epoch
        with tracker.run(name, tags=tags, parent_id=parent_id, reopen=plan.run_id,
                         system_metrics=cfg.system_metrics_every()) as run_id:
            result.run_id = run_id
            ckpt.meta = {"run_id": run_id}
            if plan.run_id is None:  # a new run (a reopened one has all this already)
                tracker.log_params(run_id, {**cfg.cell_params(cell), "weights_source": source,
                                            **({T.TUNED_FROM: cell.tuned_from}
                                               if cell.tuned_from else {})})
                tracker.log_inputs(run_id, dataset_inputs(
                    cell.dataset.dataset_key, bundle.info, cell.dataset.model_dump(mode="json"),
                    {"train": len(bundle.train), "val": len(bundle.val),
                     "test": len(bundle.test)}))
                tracker.log_dict(run_id, {
                    "benchmark": cfg.model_dump(mode="json", exclude={"datasets", "strategies",
                                                                      "seeds"}),
                    "dataset": cell.dataset.model_dump(mode="json"),
                    "strategy": {"name": cell.strategy, "params": cell.params},
                    "seed": cell.seed, "config_hash": h, "overrides": cell.overrides,
                    "study": cell.study, "tuned_from": cell.tuned_from,
                }, "config.json")
            logger = MetricsLogger(tracker, run_id)
            if plan.payload is not None:  # resumed: the checkpoint's epochs the run lacks (all
                # for a new run; for a reopened one those whose metrics never reached the
                # server, e.g. buffered during an outage when the process died)
                logged = (tracker.logged_steps(run_id, "train_loss")
                          if plan.run_id is not None else set())
                for epoch, record in enumerate(plan.payload["trainer"]["history"]):
                    if epoch not in logged:
                        logger.on_epoch_end(epoch, record)
            with explain_oom(cfg.batch_size, cfg.resolved_device()):
                train_result = train_cell(cfg, cell, bundle, weights, [logger],
                                          checkpoint=ckpt, resume=plan.payload)
            logger.flush(final=True)
            if keep_weights:
                save_selected(cfg.output_dir, h, train_result.final_state)
            tracker.log_params(run_id, train_result.data_params())
            tracker.set_tags(run_id, strategy_tags(cell.strategy))
            if train_result.test_predictions is not None:
                tracker.log_table(run_id, train_result.test_predictions, T.PREDICTIONS_ARTIFACT)
            final = train_result.summary()
            # drift and transferability measure the distance from pre-trained weights: none
            # for a strategy that starts from a random initialisation (`scratch`)
            pretrained = get_strategy(cell.strategy).pretrained_start
            if pretrained:
                final |= {f"drift/{g}": v for g, v in train_result.drift.items()}
            # per-layer transferability of the pre-trained start (Chen et al. 2022): θ_B is the
            # selected checkpoint, the result's final state; θ_r the pre-training's own start
            # where known (param transferability_reference)
            transfer, reference = run_transferability(
                cfg, bundle, train_result.start_state if pretrained else None,
                train_result.final_state, cell.dataset)
            final |= train_result.final_values
            if transfer:
                final |= transfer
                tracker.log_params(run_id, reference)
            tracker.log_metrics(run_id, final, step=cfg.epochs)
            for path, figure in train_result.artifacts.items():
                tracker.log_figure(run_id, figure, path)
        result.status, result.summary = "FINISHED", train_result.summary()
        ckpt.delete()
    except KeyboardInterrupt as exc:  # the checkpoint stays: the next call resumes from it
        result.status = "KILLED"
        # whether there is one: stopped before its first epoch ended, there is none, and the
        # CLI must not say "its last epoch is checkpointed" (:func:`signals.interrupted_message`)
        exc.checkpointed = ckpt.exists()
        raise
    except TrackingError:  # the server stayed away: every next cell would fail the same way, so
        result.status = "KILLED"  # the grid stops; the checkpoint stays for the next call
        raise
    except Exception as exc:  # one failing cell must not stop the grid
        log.exception("cell %s failed", name)
        ckpt.delete()  # a failure starts over next time (same inputs fail the same way)
        result.status, result.error = "FAILED", f"{type(exc).__name__}: {exc}"
    return result


def environment_tags() -> dict[str, str]:
    tags = {
        "metalr_bench.version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        # the CPU and the kernel set torch runs on it: the same commit gives other numbers on
        # another CPU (BENCHMARKS: "the host moved, not the code")
        "cpu": f"{platform.processor() or platform.machine()}, "
               f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    try:
        import subprocess

        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        if commit:
            tags["mlflow.source.git.commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def run_benchmark(cfg: BenchmarkConfig, *, progress: bool = True,
                  announce: Callable[[], None] | None = None) -> BenchmarkOutcome:
    """Run every cell of ``cfg`` under one parent run; returns what happened to each.

    Bad input fails in the pre-flight, before any MLflow run exists; ``announce`` (the CLI's
    "N runs ..." header) is called once the pre-flight passed, so a bad input prints its one
    error message and nothing before it. ``cfg.executor`` decides
    where cells run; with several workers the driver and workers log through an ``mlflow
    server`` (started here for a sqlite store, stopped at the end).
    """
    data = DataCache()
    preflight(cfg, data)
    if announce is not None:
        announce()
    executor = get_executor(cfg)
    with executor.tracking(cfg.tracking_uri) as uri:
        return _run_grid(cfg, executor, uri, progress, data)


def _run_grid(cfg: BenchmarkConfig, executor: Any, tracking_uri: str,
              progress: bool, data: DataCache) -> BenchmarkOutcome:
    cells = cfg.cells()
    tracker = Tracker(tracking_uri, cfg.name,
                      retry=RetryPolicy(max_total_s=cfg.tracking_retry_s),
                      fallback_dir=Path(cfg.output_dir) / "unlogged-metrics")
    mark_stale_runs(tracker)
    results: list[CellResult] = []
    with terminate_as_interrupt(), tracker.run(
        f"{cfg.name}-benchmark", tags={T.KIND: T.KIND_BENCHMARK, **environment_tags()}
    ) as parent:
        tracker.log_dict(parent, cfg.model_dump(mode="json"), "config.json")
        if cfg.references:  # published rows for the report, which reads no config module
            tracker.log_dict(parent, {"references": [r.model_dump(mode="json")
                                                     for r in cfg.references]},
                             T.REFERENCES_ARTIFACT)
        if cfg.tune.enabled:  # studies on validation data pick each strategy's parameters
            tuning = tune_all(cfg, tracker, parent, data, progress=progress,
                              executor=executor, tracking_uri=tracking_uri)
            cells, results = tuning.cells, list(tuning.failed)
        tracker.log_params(parent, {"n_cells": len(cells), "model": cfg.model.arch,
                                    "epochs": cfg.epochs, "seeds": cfg.seeds,
                                    "min_effect": cfg.min_effect})
        # pre-train here, once, before the first cell (not once per worker at the same time), so
        # its epoch lines follow `progress` like every other progress line
        if executor.n_workers > 1 or cfg.model.weights == "pretrain":
            for cell in {c.dataset.model_dump_json(): c for c in cells}.values():
                starting_weights(cfg, data.get(cell), tracker, parent, progress=progress,
                                 dataset=cell.dataset)
        results += executor.map_cells(run_cell, cfg, cells, parent, tracking_uri,
                                      tracker=tracker,
                                      data=data, progress=progress)
        board = leaderboard(results)
        if not board.empty:
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            board.to_csv(out / f"{cfg.name}-leaderboard.csv")
            tracker.log_artifact(parent, out / f"{cfg.name}-leaderboard.csv")
        n_failed = sum(r.status != "FINISHED" for r in results)
        tracker.set_tags(parent, {"n_failed": n_failed,
                                  "n_skipped": sum(r.skipped for r in results)})
    outcome = BenchmarkOutcome(parent, tracker.experiment_id, results)
    if cfg.report:  # after the parent run ended, so the report sees it FINISHED
        # imported here: papermill and nbconvert load only when a report is built
        from metalr_bench.reports.build import report_after_benchmark

        outcome.report = report_after_benchmark(cfg, parent, progress=progress)
    return outcome


LEADERBOARD_METRICS = ("test_auc", "test_acc", "test_balanced_acc", "test_f1",
                       "mean_epoch_time_s")


def leaderboard(results: list[CellResult]) -> pd.DataFrame:
    """Mean and std over seeds per (dataset, strategy), sorted by test AUC."""
    rows = [{"dataset": r.cell.dataset.dataset_key, "strategy": r.cell.strategy_label, "seed": r.cell.seed,
             **r.summary} for r in results if r.status == "FINISHED"]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    metrics = [m for m in LEADERBOARD_METRICS if m in df]
    g = df.groupby(["dataset", "strategy"])[metrics]
    board = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_std"))
    board["n_seeds"] = g.size()
    return board.sort_values(["dataset", "test_auc_mean"], ascending=[True, False])


def format_leaderboard(board: pd.DataFrame) -> str:
    """Readable text table: ``mean ± std`` per metric."""
    if board.empty:
        return "(no finished runs)"

    def cell(m: float, s: float, digits: int) -> str:
        return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) else f"{m:.{digits}f}"

    table = pd.DataFrame(index=board.index)
    for metric, digits in (("test_auc", 3), ("test_acc", 3), ("test_balanced_acc", 3),
                           ("test_f1", 3), ("mean_epoch_time_s", 2)):
        if f"{metric}_mean" in board:
            table[metric.removeprefix("test_")] = [
                cell(m, s, digits) for m, s in zip(board[f"{metric}_mean"], board[f"{metric}_std"],
                                                   strict=True)
            ]
    table["seeds"] = board["n_seeds"]
    table = table.rename(columns={"mean_epoch_time_s": "s/epoch"})
    return table.to_string()
