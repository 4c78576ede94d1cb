"""A plan next to the runs that happened: planned vs measured time, and the per-run overhead.

    run-benchmark plan --config pilot.yaml --timings t28.json --check

Why: the plan prices training steps and forward passes with step times from a benchmark
script; a real run also loads data, builds the model, logs to MLflow and writes checkpoints,
and its steps may run slower than in isolation (data loading, other jobs on the device). Before
launching a paper-scale grid a user runs a small pilot of it, and this check says how far the
plan was off on *their* machine: per strategy, the planned seconds of the finished runs found in
MLflow against their measured epoch time (the trainer's ``mean_epoch_time_s`` x epochs) and
their wall time (MLflow start to end). Wall time less the epochs and the test pass is the
per-run overhead, which ``--seconds-per-run`` then adds to the big grid's plan.

Runs are matched to the plan's final grid by their ``config_hash`` tag (the exact cell: same
data, model, strategy parameters, epochs and seed). Tuned grids' final runs carry parameters
chosen by the study, so they are matched by dataset, image size and strategy instead. Tuning
trials are not checked (pruned trials stop at a random epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

from metalr_bench.benchmark.config import BenchmarkConfig, Cell
from metalr_bench.benchmark.planning.plan import (
    SplitSizes,
    StepTimings,
    cached_sizes,
    count_run,
    final_cells,
    run_seconds,
)
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType


@dataclass(frozen=True)
class CheckRow:
    strategy: str
    runs: int  # finished runs of the grid found in MLflow
    planned_s: float  # the plan's seconds for those runs' epochs (training, BN passes, val)
    epochs_s: float  # their measured epochs: mean_epoch_time_s x epochs
    test_s: float  # the plan's seconds for their one test pass (not part of an epoch)
    wall_s: float  # their MLflow start-to-end time

    @classmethod
    def summed(cls, strategy: str, rows: list[CheckRow]) -> CheckRow:
        return cls(strategy, *(sum(getattr(r, f) for r in rows) for f in
                               ("runs", "planned_s", "epochs_s", "test_s", "wall_s")))

    @property
    def ratio(self) -> float:
        """Measured epoch time over planned: above 1 the step times were optimistic."""
        return self.epochs_s / self.planned_s if self.planned_s else float("nan")

    @property
    def overhead_per_run_s(self) -> float:
        """Wall time the plan does not model: data loading, model set-up, checkpoints, MLflow."""
        return (self.wall_s - self.epochs_s - self.test_s) / self.runs if self.runs else 0.0


def finished_runs(client: MlflowClient, experiment: str) -> list[Run]:
    """Every FINISHED benchmark cell run of ``experiment`` (all pages)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id],
                                  filter_string="attributes.status = 'FINISHED'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  page_token=token)
        runs += [r for r in page if "config_hash" in r.data.tags
                 and "mean_epoch_time_s" in r.data.metrics and r.info.end_time]
        token = page.token
        if not token:
            return runs


def _match(cfg: BenchmarkConfig, runs: list[Run]) -> list[tuple[Cell, Run]]:
    """(planned cell, run) pairs: by config_hash, or for tuned grids by dataset and strategy."""
    cells = final_cells(cfg)
    if not cfg.tune.enabled:
        by_hash = {cfg.config_hash(c): c for c in cells}
        return [(by_hash[r.data.tags["config_hash"]], r) for r in runs
                if r.data.tags["config_hash"] in by_hash]
    by_key = {(c.dataset.dataset_name, str(c.dataset.size), c.strategy): c for c in cells}
    pairs = []
    for r in runs:
        t = r.data.tags
        key = (t.get("dataset"), t.get("image_size"), t.get("strategy"))
        if t.get("tuned") == "true" and key in by_key and t.get("model") == cfg.model.arch \
                and r.data.params.get("epochs") == str(cfg.epochs):
            pairs.append((by_key[key], r))
    return pairs


def check_rows(cfg: BenchmarkConfig, timings: StepTimings, client: MlflowClient) -> list[CheckRow]:
    """One row per strategy with finished runs of this grid in the config's experiment."""
    sizes: dict[str, SplitSizes] = {}
    per_run: dict[str, list[CheckRow]] = {}
    for cell, run in _match(cfg, finished_runs(client, cfg.name)):
        split = cached_sizes(sizes, cell.dataset)
        epochs = count_run(cfg, cell, split, epochs=cfg.epochs, evaluate_test=False)
        per_run.setdefault(cell.strategy, []).append(CheckRow(
            cell.strategy, 1, planned_s=run_seconds(cfg, cell, epochs, timings),
            epochs_s=run.data.metrics["mean_epoch_time_s"] * cfg.epochs,
            test_s=split.test * timings.forward_s_per_image(cell.dataset.size),
            wall_s=(run.info.end_time - run.info.start_time) / 1000))
    return [CheckRow.summed(s, rows) for s, rows in per_run.items()]


def format_check(cfg: BenchmarkConfig, rows: list[CheckRow], tracking_uri: str) -> str:
    if not rows:
        return (f"check: no finished run of this grid in experiment {cfg.name!r} at "
                f"{tracking_uri}; run a small pilot of it first (fewer seeds or epochs, "
                "`subsample_train`), then plan the pilot's config with --check")
    lines = [f"check against {sum(r.runs for r in rows)} finished run(s) of experiment "
             f"{cfg.name!r} ({tracking_uri}):",
             f"{'strategy':24s} {'runs':>5s} {'epochs planned':>15s} {'measured':>9s} "
             f"{'ratio':>6s} {'run wall':>9s} {'outside epochs/run':>19s}"]
    total = CheckRow.summed("all", rows)
    for r in [*rows, total]:
        lines.append(f"{r.strategy:24s} {r.runs:5d} {r.planned_s:14.1f}s {r.epochs_s:8.1f}s "
                     f"{r.ratio:6.2f} {r.wall_s:8.1f}s {r.overhead_per_run_s:18.1f}s")
    overhead = max(total.overhead_per_run_s, 0.0)
    lines.append(f"The epochs took {total.ratio:.2f}x the planned time (re-measure the step "
                 "times on a quiet device if this is far from 1); each run also spent "
                 f"{overhead:.1f} s outside its epochs and test pass (data, model set-up, "
                 f"checkpoints, MLflow): plan the big grid with `--seconds-per-run "
                 f"{overhead:.1f}`.")
    return "\n".join(lines)
