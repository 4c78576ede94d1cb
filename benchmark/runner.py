"""Run the grid: a parent MLflow run per call, one child run per cell, a leaderboard at the end.

Data flows one way: config -> dataset + model -> strategy -> trainer -> tracker. The runner is
the only place that knows all of them; nothing below it talks to MLflow except through the
trainer's callbacks.
"""

from __future__ import annotations

import logging
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from metalr_bench.benchmark.checkpoint import CellCheckpoint
from metalr_bench.benchmark.config import BenchmarkConfig, Cell
from metalr_bench.benchmark.faults import RetryPolicy, explain_oom
from metalr_bench.benchmark.heartbeat import heartbeat
from metalr_bench.benchmark.layer_groups import layer_groups
from metalr_bench.benchmark.models import build_model, imagenet_state, load_state, read_checkpoint
from metalr_bench.benchmark.preflight import preflight
from metalr_bench.benchmark.pretrain import pretrained_checkpoint
from metalr_bench.benchmark.resume import mark_stale_parents, owner_tags, plan_cell
from metalr_bench.benchmark.signals import terminate_as_interrupt
from metalr_bench.benchmark.tracking import MetricsLogger, Tracker
from metalr_bench.benchmark.trainer import Trainer, TrainerOptions, TrainResult, seed_everything
from metalr_bench.datasets.base import DatasetBundle
from metalr_bench.datasets.registry import load_dataset
from metalr_bench.strategies.base import TrainSettings
from metalr_bench.strategies.registry import get_strategy

log = logging.getLogger(__name__)


@dataclass
class CellResult:
    cell: Cell
    run_id: str
    config_hash: str
    status: str
    summary: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    skipped: bool = False  # an earlier call already finished it (resume)


@dataclass
class BenchmarkOutcome:
    parent_run_id: str
    experiment_id: str
    results: list[CellResult]
    report: Any = None  # reports.build.ReportPaths when a report was built

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results if r.status != "FINISHED"]


class DataCache:
    """Load each dataset once per call (cells share it)."""

    def __init__(self) -> None:
        self._data: dict[str, DatasetBundle] = {}

    def get(self, cell: Cell) -> DatasetBundle:
        d = cell.dataset
        key = d.model_dump_json()
        if key not in self._data:
            self._data[key] = load_dataset(
                d.name, root=d.root, size=d.size, download=d.download,
                allow_md5_mismatch=d.allow_md5_mismatch, options=d.options,
            )
        return self._data[key]


def starting_weights(
    cfg: BenchmarkConfig, bundle: DatasetBundle, tracker: Tracker | None, parent_id: str | None
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The pre-trained state for this dataset's input size and its description."""
    w = cfg.model.weights
    if w == "none":
        return None, "none (random init)"
    if w == "imagenet":
        return imagenet_state(cfg.model.arch), "imagenet"
    if w == "pretrain":
        path = pretrained_checkpoint(
            cfg.model.arch, cfg.model.pretrain, bundle.image_size,
            cache_dir=Path(cfg.output_dir) / "cache" / "pretrain",
            device=cfg.resolved_device(), amp=cfg.use_amp(),
            channels_last=cfg.use_channels_last(), tracker=tracker, parent_id=parent_id,
        )
        return read_checkpoint(path), f"pretrain:{path.name}"
    return read_checkpoint(w), w


def train_cell(
    cfg: BenchmarkConfig,
    cell: Cell,
    bundle: DatasetBundle,
    weights: dict[str, torch.Tensor] | None,
    callbacks: list[Any] | None = None,
    *,
    epochs: int | None = None,
    checkpoint: CellCheckpoint | None = None,
    resume: dict[str, Any] | None = None,
    evaluate_test: bool = True,
) -> tuple[TrainResult, Any]:
    """Build model + strategy for ``cell`` and train it; no tracking in here.

    ``evaluate_test=False`` (tuning) never touches the test split.
    """
    cfg = cfg.effective(cell)
    seed_everything(cell.seed)
    model = build_model(cfg.model.arch, bundle.in_channels, bundle.num_outputs)
    if weights is not None:
        load_state(model, cfg.model.arch, weights, cfg.model.weights)
    groups = layer_groups(model)
    epochs = epochs or cfg.epochs
    options = TrainerOptions(
        epochs=epochs, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        device=cfg.resolved_device(), amp=cfg.use_amp(), channels_last=cfg.use_channels_last(),
        compile=cfg.compile, augment=cfg.augment, precise_bn=cfg.precise_bn,
        selection_metric=cfg.selection_metric,
        seed=cell.seed, log_every_n_steps=cfg.log_every_n_steps,
        deterministic=cfg.deterministic, evaluate_test=evaluate_test,
    )
    n_train = len(bundle.train)
    settings = TrainSettings(
        lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
        momentum=cfg.momentum, epochs=epochs,
        steps_per_epoch=max(n_train // cfg.batch_size, 1),
    )
    strategy = get_strategy(cell.strategy)(cell.params, model, groups, settings)
    trainer = Trainer(bundle, model, groups, strategy, options, callbacks, checkpoint)
    return trainer.fit(resume), strategy


def cell_tags(cfg: BenchmarkConfig, cell: Cell) -> dict[str, Any]:
    return {
        "dataset": cell.dataset.name,
        "image_size": cell.dataset.size,
        "strategy": cell.strategy,
        "strategy_label": cell.label,
        "seed": cell.seed,
        "model": cfg.model.arch,
        "config_hash": cfg.config_hash(cell),
        **({"tuned": "true", "optuna.study_name": cell.study} if cell.study else {}),
    }


def cell_params(cfg: BenchmarkConfig, cell: Cell) -> dict[str, Any]:
    cfg = cfg.effective(cell)
    strategy_params = get_strategy(cell.strategy).Params(**cell.params).model_dump(mode="json")
    return {
        "dataset": cell.dataset.name, "image_size": cell.dataset.size, "strategy": cell.strategy,
        "seed": cell.seed, "model": cfg.model.arch, "weights": cfg.model.weights,
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "optimizer": cfg.optimizer, "weight_decay": cfg.weight_decay,
        **{f"strategy.{k}": v for k, v in strategy_params.items()},
    }


def run_cell(
    cfg: BenchmarkConfig,
    cell: Cell,
    tracker: Tracker,
    parent_id: str,
    data: DataCache,
) -> CellResult:
    """Train one cell inside its own child run."""
    cfg = cfg.effective(cell)
    h = cfg.config_hash(cell)
    bundle = data.get(cell)
    name = f"{cell.dataset_label}/{cell.label}/seed{cell.seed}"
    result = CellResult(cell, "", h, "RUNNING")
    ckpt = CellCheckpoint(Path(cfg.output_dir) / "checkpoints", h)
    plan = plan_cell(tracker, h, ckpt, force=cfg.force)
    if plan.action in ("skip", "busy"):
        busy = plan.action == "busy"
        return CellResult(cell, plan.run_id or "", h, "RUNNING" if busy else "FINISHED",
                          plan.summary, skipped=True,
                          error=plan.note if busy else None)
    try:
        weights, source = starting_weights(cfg, bundle, tracker, parent_id)
        tags = {**cell_tags(cfg, cell), **owner_tags()}
        if plan.payload is not None:
            tags["resumed_from_epoch"] = plan.resume_epoch
        with tracker.run(name, tags=tags, parent_id=parent_id, reopen=plan.run_id) as run_id:
            result.run_id = run_id
            ckpt.meta = {"run_id": run_id}
            if plan.run_id is None:  # a new run (a reopened one has all this already)
                tracker.log_params(run_id, {**cell_params(cfg, cell), "weights_source": source})
                tracker.log_dict(run_id, {
                    "benchmark": cfg.model_dump(mode="json", exclude={"datasets", "strategies",
                                                                      "seeds"}),
                    "dataset": cell.dataset.model_dump(mode="json"),
                    "strategy": {"name": cell.strategy, "params": cell.params},
                    "seed": cell.seed, "config_hash": h, "overrides": cell.overrides,
                    "study": cell.study,
                }, "config.json")
            logger = MetricsLogger(tracker, run_id)
            if plan.payload is not None and plan.run_id is None:  # resumed into a new run
                for epoch, record in enumerate(plan.payload["trainer"]["history"]):
                    logger.on_epoch_end(epoch, record)
            with explain_oom(cfg.batch_size, cfg.resolved_device()), \
                    heartbeat(tracker.client, run_id):
                train_result, strategy = train_cell(cfg, cell, bundle, weights, [logger],
                                                    checkpoint=ckpt, resume=plan.payload)
            logger.flush(final=True)
            final = train_result.summary()
            final |= {f"drift/{g}": v for g, v in train_result.drift.items()}
            tracker.log_metrics(run_id, final, step=cfg.epochs)
            for artifact in getattr(strategy, "artifacts", lambda: {})().items():
                tracker.log_figure(run_id, artifact[1], artifact[0])
        result.status, result.summary = "FINISHED", train_result.summary()
        ckpt.delete()
    except KeyboardInterrupt:  # the checkpoint stays: the next call resumes from it
        result.status = "KILLED"
        raise
    except Exception as exc:  # one failing cell must not stop the grid
        log.exception("cell %s failed", name)
        ckpt.delete()  # a failure starts over next time (same inputs fail the same way)
        result.status, result.error = "FAILED", f"{type(exc).__name__}: {exc}"
    return result


def environment_tags() -> dict[str, str]:
    import metalr_bench.benchmark as pkg

    tags = {
        "metalr_bench.version": pkg.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
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


def run_benchmark(cfg: BenchmarkConfig, *, progress: bool = True) -> BenchmarkOutcome:
    """Run every cell of ``cfg`` under one parent run; returns what happened to each.

    Bad input fails in the pre-flight, before any MLflow run exists. ``cfg.executor`` decides
    where cells run; with several workers the driver and workers log through an ``mlflow
    server`` (started here for a sqlite store, stopped at the end).
    """
    from metalr_bench.benchmark.executors import get_executor

    data = DataCache()
    preflight(cfg, data)
    executor = get_executor(cfg)
    with executor.tracking(cfg.tracking_uri) as uri:
        return _run_grid(cfg, executor, uri, progress, data)


def _run_grid(cfg: BenchmarkConfig, executor: Any, tracking_uri: str,
              progress: bool, data: DataCache) -> BenchmarkOutcome:
    cells = cfg.cells()
    tracker = Tracker(tracking_uri, cfg.name,
                      retry=RetryPolicy(max_total_s=cfg.tracking_retry_s),
                      fallback_dir=Path(cfg.output_dir) / "unlogged-metrics")
    mark_stale_parents(tracker)
    results: list[CellResult] = []
    with terminate_as_interrupt(), tracker.run(
        f"{cfg.name}-benchmark", tags={"kind": "benchmark", **environment_tags(), **owner_tags()}
    ) as parent, heartbeat(tracker.client, parent):
        tracker.log_dict(parent, cfg.model_dump(mode="json"), "config.json")
        if cfg.tune.enabled:  # studies on validation data pick each strategy's parameters
            from metalr_bench.benchmark.tuning import tune_all

            tuning = tune_all(cfg, tracker, parent, data, progress=progress,
                              executor=executor, tracking_uri=tracking_uri)
            cells, results = tuning.cells, list(tuning.failed)
        tracker.log_params(parent, {"n_cells": len(cells), "model": cfg.model.arch,
                                    "epochs": cfg.epochs, "seeds": cfg.seeds})
        if executor.n_workers > 1:  # pre-train once here, not once per worker at the same time
            for cell in {c.dataset.model_dump_json(): c for c in cells}.values():
                starting_weights(cfg, data.get(cell), tracker, parent)
        results += executor.map_cells(cfg, cells, parent, tracking_uri, tracker=tracker,
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
        from metalr_bench.reports.build import report_after_benchmark

        outcome.report = report_after_benchmark(cfg, parent, progress=progress)
    return outcome


LEADERBOARD_METRICS = ("test_auc", "test_acc", "test_balanced_acc", "test_f1",
                       "mean_epoch_time_s")


def leaderboard(results: list[CellResult]) -> pd.DataFrame:
    """Mean and std over seeds per (dataset, strategy), sorted by test AUC."""
    rows = [{"dataset": r.cell.dataset_label, "strategy": r.cell.label, "seed": r.cell.seed,
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
