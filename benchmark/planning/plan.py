"""What a grid will cost before it runs: runs, training iterations and expected device time.

    run-benchmark plan --config configs/medmnist.yaml
    run-benchmark plan --config configs/medmnist.yaml --timings gpu-28.json gpu-64.json --devices 4

Why: a paper-scale grid is hundreds of runs plus the tuning trials before them; a user should
learn that it needs 40 GPU-hours, and which dataset and strategy take them, before starting it.
The plan counts exactly what the runner will do (the same epochs, the trainer's ``drop_last``
batches, MetaLR's held-out meta split, precise-BN passes, validation every epoch, test once) and
prices it with step times *measured on the user's device* by
:mod:`metalr_bench.benchmark.perf.bench_throughput` (``--json``), or with one uniform seconds/iteration.
No timing is guessed: without timings the plan prints counts only.

Dataset sizes come from the files when present (MedMNIST: only the label arrays are read), else
from the official MedMNIST catalogue, so a grid can be planned before anything is downloaded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from metalr_bench.benchmark.config import (
    BenchmarkConfig,
    Cell,
    ConfigError,
    DatasetSpec,
    tuned_controls,
)
from metalr_bench.benchmark.training.trainer import TrainerSettings
from metalr_bench.datasets.core.medmnist_info import INFO, N_SAMPLES, npz_name
from metalr_bench.datasets.core.registry import load_dataset
from metalr_bench.datasets.medmnist import default_root
from metalr_bench.strategies.core.registry import get_strategy

#: the trainer's defaults the runner keeps: BatchNorm re-estimation batches before each
#: evaluation, and the share of train held out for strategies with meta_source holdout/fixed
#: (meta_source train draws meta batches from the whole training set: nothing held out)
PRECISE_BN_BATCHES = TrainerSettings.precise_bn_batches
META_FRACTION = TrainerSettings.meta_fraction


class PlanError(ConfigError):
    """A plan cannot be priced (a timing is missing); the message says what to measure."""


@dataclass(frozen=True)
class SplitSizes:
    train: int
    val: int
    test: int
    source: str  # where the counts came from


def split_sizes(spec: DatasetSpec) -> SplitSizes:
    """Image counts of ``spec``'s splits, without loading its images where that can be avoided."""
    if spec.adapter in INFO:
        root = Path(spec.root).expanduser() if spec.root else default_root()
        path = root / npz_name(spec.adapter, spec.size)
        if path.exists():
            with np.load(path) as z:  # NpzFile: only the arrays asked for are decompressed
                n = {s: len(z[f"{s}_labels"]) for s in ("train", "val", "test")}
            source = str(path)
        else:
            n = dict(N_SAMPLES[spec.adapter])
            source = f"MedMNIST catalogue ({path.name} not in {root})"
        sub = spec.options.get("subsample_train")
        if sub is not None:
            n["train"] = min(int(sub), n["train"])
        return SplitSizes(n["train"], n["val"], n["test"], source)
    b = load_dataset(spec.adapter, root=spec.root, size=spec.size, download=False,
                     allow_md5_mismatch=spec.allow_md5_mismatch, options=spec.options)
    return SplitSizes(len(b.train), len(b.val), len(b.test), "loaded")


def cached_sizes(cache: dict[str, SplitSizes], spec: DatasetSpec) -> SplitSizes:
    """:func:`split_sizes` once per dataset spec (a grid repeats each over seeds and strategies;
    a folder dataset is loaded to count it)."""
    key = spec.model_dump_json()
    if key not in cache:
        cache[key] = split_sizes(spec)
    return cache[key]


def _strategy_params(cell: Cell) -> Any:
    return get_strategy(cell.strategy).Params(**cell.params)


def _meta_source(cell: Cell) -> str | None:
    return getattr(_strategy_params(cell), "meta_source", get_strategy(cell.strategy).meta_source)


def train_batches(n_train: int, batch_size: int) -> int:
    """Batches per epoch of the trainer's loader (``drop_last`` when there is more than one)."""
    return n_train // batch_size if n_train > batch_size else max(math.ceil(n_train / batch_size), 1)


@dataclass(frozen=True)
class RunCount:
    """What one run of a cell does, in iterations and forward-only images."""

    train_steps: int  # optimizer steps, all epochs
    #: precise-BN passes + validation each epoch + test twice (final runs: the checkpoint chosen
    #: on validation, and the last epoch's weights for ``last_test_*``)
    forward_images: int


def count_run(cfg: BenchmarkConfig, cell: Cell, sizes: SplitSizes, *, epochs: int,
              evaluate_test: bool) -> RunCount:
    eff = cfg.effective(cell)
    n_train = sizes.train
    if _meta_source(cell) in ("holdout", "fixed"):  # held out whole groups: close, not exact
        n_train -= round(n_train * META_FRACTION)
    per_epoch = train_batches(n_train, eff.batch_size)
    forward = sizes.val
    if eff.precise_bn:
        bn_batches = min(PRECISE_BN_BATCHES, math.ceil(n_train / eff.batch_size))
        forward += min(bn_batches * eff.batch_size, n_train)
    return RunCount(train_steps=epochs * per_epoch,
                    forward_images=epochs * forward + (2 * sizes.test if evaluate_test else 0))


# -- timings ---------------------------------------------------------------------------------------
class StepTimings:
    """Seconds per training image per (strategy, size), and per forward-only image per size.

    Built from :mod:`bench_throughput` rows (its ``--json`` file) or from one uniform
    seconds/iteration. Rows are measured at each strategy's default parameters; a cell whose
    parameters change its cost pays ``full + (measured - full) * share`` per image, with the
    share its strategy declares (``Strategy.measured_cost_share``: for MetaLR with interval k
    and meta batch m at training batch b, ``(m / b) / k``: one forward/backward on the meta
    batch every k-th iteration).
    """

    def __init__(self, rows: Iterable[dict[str, Any]] = (), *, uniform_s_per_iter: float | None = None,
                 uniform_batch: int | None = None, device: str | None = None,
                 per_run_s: float = 0.0) -> None:
        self.per_run_s = per_run_s  # outside training: data, model set-up, MLflow, checkpoints
        self.train: dict[tuple[str, int], float] = {}
        self.forward: dict[int, float] = {}
        self.uniform = (uniform_s_per_iter / uniform_batch
                        if uniform_s_per_iter is not None and uniform_batch else None)
        names = set()
        self.archs: set[str] = set()  # models the rows were measured on (empty: uniform)
        for r in rows:
            if "arch" in r:
                self.archs.add(r["arch"])
            per_image = float(r["s_per_iter"]) / int(r["batch_size"])
            if r["strategy"] == "eval":
                self.forward[int(r["size"])] = per_image
            else:
                self.train[(r["strategy"], int(r["size"]))] = per_image
            names.add(r.get("device_name", r.get("device", "?")))
        self.device = device or (", ".join(sorted(names)) if names else "uniform s/iteration")

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], per_run_s: float = 0.0) -> StepTimings:
        rows: list[dict[str, Any]] = []
        for p in paths:
            try:
                data = json.loads(Path(p).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise PlanError(f"--timings {p}: cannot read it as bench_throughput JSON ({exc}); "
                                "write one with `python -m metalr_bench.benchmark.perf.bench_throughput "
                                "--json FILE`") from None
            if not isinstance(data, list) or not all(
                isinstance(r, dict) and {"strategy", "size", "s_per_iter", "batch_size"} <= set(r)
                for r in data
            ):
                raise PlanError(f"--timings {p}: expected the list of rows bench_throughput "
                                "--json writes (strategy, size, batch_size, s_per_iter)")
            rows.extend(data)
        return cls(rows, per_run_s=per_run_s)

    def train_s_per_image(self, cell: Cell, batch_size: int) -> float:
        if self.uniform is not None:
            return self.uniform
        size = cell.dataset.size
        key = (cell.strategy, size)
        if key not in self.train:
            raise PlanError(
                f"no step time for strategy {cell.strategy!r} at {size} px in the timings "
                f"(have: {', '.join(f'{s}@{z}' for s, z in sorted(self.train)) or 'none'}); "
                f"measure it on the device the benchmark will run on with `python -m "
                f"metalr_bench.benchmark.perf.bench_throughput --size {size} --json t{size}.json` "
                "and pass every file to --timings"
            )
        t = self.train[key]
        share = get_strategy(cell.strategy).measured_cost_share(_strategy_params(cell),
                                                                batch_size)
        if share != 1.0 and ("full", size) in self.train:
            full = self.train[("full", size)]
            t = full + (t - full) * share
        return t

    def forward_s_per_image(self, size: int) -> float:
        """Forward-only cost; a third of full fine-tuning's step when not measured (a forward
        pass is about a third of forward + backward)."""
        if self.uniform is not None:
            return self.uniform / 3
        if size in self.forward:
            return self.forward[size]
        if ("full", size) in self.train:
            return self.train[("full", size)] / 3
        raise PlanError(f"no forward (eval) or full-FT time at {size} px in the timings; "
                        f"measure with bench_throughput --size {size} --json FILE")


def run_seconds(cfg: BenchmarkConfig, cell: Cell, count: RunCount, timings: StepTimings) -> float:
    """Device seconds of one run of ``cell``: its training steps and forward-only images
    (without the per-run overhead outside training)."""
    batch = cfg.effective(cell).batch_size
    return (count.train_steps * batch * timings.train_s_per_image(cell, batch)
            + count.forward_images * timings.forward_s_per_image(cell.dataset.size))


# -- the plan --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanRow:
    phase: str  # "tuning" (upper bound: pruned trials stop early) or "final"
    dataset: str
    strategy: str
    runs: int
    epochs: int
    train_steps: int  # all runs
    forward_images: int  # all runs
    seconds: float | None  # all runs, None without timings


def study_cells(cfg: BenchmarkConfig, *, controls: bool = False) -> list[Cell]:
    """One cell per tuning study (dataset x strategy), its fixed (non-list) parameters set. A
    control that runs at another strategy's tuned parameters (``config.tuned_controls``) has no
    study; ``controls=True`` lists it anyway (the final grid trains it)."""
    skip = set() if controls else set(tuned_controls(cfg))
    return [Cell(dataset=d, strategy=s.name, seed=cfg.tune.seed,
                 params={k: v for k, v in s.params.items() if not isinstance(v, list)})
            for d in cfg.dataset_specs() for s in cfg.strategies if s.name not in skip]


def final_cells(cfg: BenchmarkConfig) -> list[Cell]:
    """The final grid: every seed of each study's cell when tuning (its tuned parameters are
    not known yet; they rarely change the cost), else ``cfg.cells()``."""
    if not cfg.tune.enabled:
        return cfg.cells()
    return [Cell(dataset=c.dataset, strategy=c.strategy, params=c.params, seed=seed)
            for c in study_cells(cfg, controls=True) for seed in cfg.seeds]


def plan_rows(cfg: BenchmarkConfig, timings: StepTimings | None = None,
              sizes: dict[str, SplitSizes] | None = None) -> list[PlanRow]:
    """One row per (phase, dataset, strategy): the tuning studies' trials, then the final grid.

    With tuning, the final grid has one parameter setting per strategy (the study's best);
    without, it is ``cfg.cells()`` (every listed parameter value).
    """
    sizes = sizes if sizes is not None else {}
    if timings is not None and timings.archs and cfg.model.arch not in timings.archs:
        raise PlanError(f"the timings were measured on {', '.join(sorted(timings.archs))}, the "
                        f"grid trains {cfg.model.arch}: measure with `python -m "
                        f"metalr_bench.benchmark.perf.bench_throughput --model {cfg.model.arch} ...`")
    rows: list[PlanRow] = []

    def add(phase: str, cells: list[Cell], runs_per_cell: int, epochs: int, test: bool) -> None:
        for cell in cells:
            c = count_run(cfg, cell, cached_sizes(sizes, cell.dataset), epochs=epochs,
                          evaluate_test=test)
            steps, fwd = c.train_steps * runs_per_cell, c.forward_images * runs_per_cell
            secs = None
            if timings is not None:
                secs = (run_seconds(cfg, cell, c, timings) + timings.per_run_s) * runs_per_cell
            rows.append(PlanRow(phase, cell.dataset.dataset_key, cell.strategy, runs_per_cell, epochs,
                                steps, fwd, secs))

    if cfg.tune.enabled:
        add("tuning", study_cells(cfg), cfg.tune.n_trials, cfg.tune.epochs or cfg.epochs, False)
    add("final", final_cells(cfg), 1, cfg.epochs, True)
    return _merge(rows)


def _merge(rows: list[PlanRow]) -> list[PlanRow]:
    """Sum rows of the same (phase, dataset, strategy) (seeds, parameter values)."""
    out: dict[tuple[str, str, str], PlanRow] = {}
    for r in rows:
        k = (r.phase, r.dataset, r.strategy)
        if k in out:
            o = out[k]
            secs = None if o.seconds is None or r.seconds is None else o.seconds + r.seconds
            r = PlanRow(r.phase, r.dataset, r.strategy, o.runs + r.runs, r.epochs,
                        o.train_steps + r.train_steps, o.forward_images + r.forward_images, secs)
        out[k] = r
    return list(out.values())


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:,.1f} h"


def format_plan(cfg: BenchmarkConfig, rows: list[PlanRow], timings: StepTimings | None,
                devices: int = 1) -> str:
    """The plan as the user reads it: totals per strategy, per dataset, and the wall-clock."""
    lines = [f"plan {cfg.name!r}: {cfg.model.arch}, batch {cfg.batch_size}, "
             f"{len(cfg.dataset_specs())} dataset(s) x {len(cfg.strategies)} strateg(ies) x "
             f"{len(cfg.seeds)} seed(s)"]
    for phase in ("tuning", "final"):
        pr = [r for r in rows if r.phase == phase]
        if not pr:
            continue
        runs = sum(r.runs for r in pr)
        what = (f"{runs} trials ({cfg.tune.n_trials} per study, {len(pr)} studies) x "
                f"{pr[0].epochs} epochs, upper bound: pruned trials stop early"
                if phase == "tuning" else f"{runs} runs x {pr[0].epochs} epochs")
        if timings is not None:
            what += f"; device time {_duration(sum(r.seconds or 0.0 for r in pr))}"
        lines.append(f"  {phase}: {what}")
    for by, key in (("strategy", lambda r: r.strategy), ("dataset", lambda r: r.dataset)):
        lines.append("")
        lines.append(f"{by:24s} {'runs':>6s} {'train iters':>12s} {'fwd images':>12s} "
                     f"{'device time':>12s}")
        groups: dict[str, list[PlanRow]] = {}
        for r in rows:
            groups.setdefault(key(r), []).append(r)
        for name, rs in groups.items():
            secs = [r.seconds for r in rs]
            total = None if None in secs else sum(s for s in secs if s is not None)
            lines.append(f"{name:24s} {sum(r.runs for r in rs):6d} "
                         f"{sum(r.train_steps for r in rs):12,d} "
                         f"{sum(r.forward_images for r in rs):12,d} {_duration(total):>12s}")
    lines.append("")
    if timings is None:
        lines.append("No timings: pass --timings FILE.json (from `python -m "
                     "metalr_bench.benchmark.perf.bench_throughput --size N --json FILE.json` on the "
                     "device the benchmark will run on) or --seconds-per-iter S to price the "
                     "plan.")
        return "\n".join(lines)
    total = sum(r.seconds or 0.0 for r in rows)
    outside = (f"plus {timings.per_run_s:g} s per run outside training" if timings.per_run_s
               else "time outside training (data, model set-up, MLflow) not counted: measure "
               "it on a pilot with --check, add it with --seconds-per-run")
    lines.append(f"total device time: {_duration(total)} at the step times of {timings.device} "
                 f"(one run per device, pre-training not counted; {outside})")
    if devices > 1:
        lines.append(f"with {devices} devices: about {_duration(total / devices)} wall-clock "
                     "(less when runs sharing a device (--gpus-per-run) do not saturate it alone)")
    return "\n".join(lines)
