"""`run-benchmark plan`: the counts match what the trainer really does, and the prices follow
from step times measured by bench_throughput."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from metalr_bench.benchmark.cli import main
from metalr_bench.benchmark.config import Cell, DatasetSpec, load_config
from metalr_bench.benchmark.perf import bench_throughput
from metalr_bench.benchmark.planning.plan import (
    PlanError,
    StepTimings,
    count_run,
    format_plan,
    plan_rows,
    split_sizes,
)
from metalr_bench.benchmark.training import cell as cell_mod
from metalr_bench.datasets.core.medmnist_info import N_SAMPLES


@pytest.fixture
def cfg(tiny_config: dict[str, Any]):
    tiny_config["strategies"] = ["full", "last_k", "l2sp", "metalr"]
    tiny_config["precise_bn"] = True
    return load_config(None, tiny_config)


def _counting_build(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make the runner's models count the images they see, with and without autograd."""
    seen = {"grad": 0, "no_grad": 0}
    real = cell_mod.build_model

    def build(*a: Any, **k: Any) -> torch.nn.Module:
        model = real(*a, **k)

        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], _out: Any) -> None:
            seen["grad" if torch.is_grad_enabled() else "no_grad"] += args[0].shape[0]

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(cell_mod, "build_model", build)
    return seen


@pytest.mark.parametrize("strategy", ["full", "last_k", "l2sp"])
def test_counts_match_the_trainer(cfg, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _counting_build(monkeypatch)
    cell = Cell(dataset=cfg.datasets[0], strategy=strategy, params={}, seed=0)
    bundle = cell_mod.DataCache().get(cell)
    cell_mod.train_cell(cfg, cell, bundle, None)
    planned = count_run(cfg, cell, split_sizes(cell.dataset), epochs=cfg.epochs,
                        evaluate_test=True)
    assert planned.train_steps > 0
    assert seen["grad"] == planned.train_steps * cfg.batch_size  # drop_last batches, every epoch
    assert seen["no_grad"] == planned.forward_images  # precise-BN + val each epoch + test twice


def test_metalr_counts_its_held_out_split(cfg) -> None:
    cell = Cell(dataset=cfg.datasets[0], strategy="metalr", params={"meta_source": "holdout"},
                seed=0)
    bundle = cell_mod.DataCache().get(cell)
    built = cell_mod.build_cell(cfg, cell, bundle, None)
    assert built.trainer is not None
    built.trainer.fit()
    strategy = built.strategy
    planned = count_run(cfg, cell, split_sizes(cell.dataset), epochs=cfg.epochs,
                        evaluate_test=True)
    full = count_run(cfg, Cell(dataset=cell.dataset, strategy="full", params={}, seed=0),
                     split_sizes(cell.dataset), epochs=cfg.epochs, evaluate_test=True)
    assert planned.train_steps < full.train_steps  # a fifth of train is the meta split
    # whole patients are held out, so the split is close, not exact: within a batch per epoch
    assert abs(strategy.step - planned.train_steps) <= cfg.epochs
    default = Cell(dataset=cell.dataset, strategy="metalr", params={}, seed=0)  # meta_source train
    assert count_run(cfg, default, split_sizes(cell.dataset), epochs=cfg.epochs,
                     evaluate_test=True).train_steps == full.train_steps


def _write_npz(path: Path, counts: tuple[int, int, int]) -> None:
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        arrays[f"{split}_images"] = np.zeros((n, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)


def test_split_sizes_from_the_file_else_the_catalogue(tmp_path: Path) -> None:
    _write_npz(tmp_path / "pneumoniamnist.npz", (30, 7, 9))
    got = split_sizes(DatasetSpec(adapter="pneumoniamnist", root=str(tmp_path), size=28))
    assert (got.train, got.val, got.test) == (30, 7, 9)
    assert got.source == str(tmp_path / "pneumoniamnist.npz")
    missing = split_sizes(DatasetSpec(adapter="bloodmnist", root=str(tmp_path), size=64))
    assert (missing.train, missing.val, missing.test) == tuple(N_SAMPLES["bloodmnist"].values())
    assert "catalogue" in missing.source and "bloodmnist_64.npz" in missing.source
    sub = split_sizes(DatasetSpec(adapter="bloodmnist", root=str(tmp_path), size=28,
                                  options={"subsample_train": 500}))
    assert sub.train == 500


@pytest.fixture(scope="module")
def timings_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real bench_throughput rows (smallcnn, 16 px) as `--json` writes them."""
    path = tmp_path_factory.mktemp("timings") / "t16.json"
    bench_throughput.main(["--model", "smallcnn", "--size", "16", "--batch-size", "8",
                           "--iters", "2", "--warmup", "1", "--device", "cpu",
                           "--strategies", "full", "last_k", "l2sp", "metalr",
                           "--eval-batch-size", "16", "--json", str(path)])
    return path


def test_prices_are_counts_times_measured_step_times(cfg, timings_file: Path) -> None:
    rows = json.loads(timings_file.read_text())
    per_image = {r["strategy"]: r["s_per_iter"] / r["batch_size"] for r in rows}
    assert set(per_image) == {"full", "last_k", "l2sp", "metalr", "eval"}
    timings = StepTimings.from_files([timings_file])
    plan = plan_rows(cfg, timings)
    sizes = split_sizes(cfg.datasets[0])
    for row in plan:
        cell = Cell(dataset=cfg.datasets[0], strategy=row.strategy, params={}, seed=0)
        one = count_run(cfg, cell, sizes, epochs=cfg.epochs, evaluate_test=True)
        assert row.runs == len(cfg.seeds)
        assert row.train_steps == one.train_steps * len(cfg.seeds)
        expected = (row.train_steps * cfg.batch_size * per_image[row.strategy]
                    + row.forward_images * per_image["eval"])
        assert row.seconds == pytest.approx(expected)
    text = format_plan(cfg, plan, timings, devices=2)
    total = sum(r.seconds for r in plan)
    assert "with 2 devices" in text and "total device time" in text
    assert f"{total / 60:.1f} min" in text


def test_metalr_interval_and_missing_timings(cfg, timings_file: Path) -> None:
    timings = StepTimings.from_files([timings_file])
    rows = {r["strategy"]: r["s_per_iter"] / r["batch_size"]
            for r in json.loads(timings_file.read_text())}
    extra = rows["metalr"] - rows["full"]
    every2 = Cell(dataset=cfg.datasets[0], strategy="metalr", params={"meta_interval": 2},
                  seed=0)
    # the meta step runs every 2nd iteration: full's cost plus half of MetaLR's extra
    assert timings.train_s_per_image(every2, 16) == pytest.approx(rows["full"] + extra / 2)
    # a meta batch of 4 images next to training batches of 16: a quarter of the extra
    small = Cell(dataset=cfg.datasets[0], strategy="metalr", params={"meta_batch_size": 4},
                 seed=0)
    assert timings.train_s_per_image(small, 16) == pytest.approx(rows["full"] + extra / 4)
    other = cfg.model_copy(update={"datasets": [DatasetSpec(adapter="synthetic", size=32)]})
    with pytest.raises(PlanError, match=r"'full' at 32 px.*--size 32 --json"):
        plan_rows(other, timings)
    resnet = cfg.model_copy(update={"model": cfg.model.model_copy(update={"arch": "resnet18"})})
    with pytest.raises(PlanError, match=r"measured on smallcnn.*--model resnet18"):
        plan_rows(resnet, timings)


def test_tuning_phase_counts_trials(cfg) -> None:
    tuned = cfg.model_copy(update={"tune": cfg.tune.model_copy(
        update={"enabled": True, "n_trials": 3, "epochs": 1})})
    plan = plan_rows(tuned)
    tuning = [r for r in plan if r.phase == "tuning"]
    final = [r for r in plan if r.phase == "final"]
    assert [r.runs for r in tuning] == [3] * 4 and {r.epochs for r in tuning} == {1}
    assert [r.runs for r in final] == [len(cfg.seeds)] * 4 and {r.epochs for r in final} == {2}
    # tuning trials never touch the test split; final runs evaluate it twice (the checkpoint
    # chosen on validation, and the last epoch's weights for last_test_*)
    t_full = next(r for r in tuning if r.strategy == "full")
    f_full = next(r for r in final if r.strategy == "full")
    sizes = split_sizes(cfg.datasets[0])
    assert f_full.forward_images / f_full.runs - 2 * t_full.forward_images / t_full.runs \
        == 2 * sizes.test


def test_cli_plan(tiny_config: dict[str, Any], tmp_path: Path, timings_file: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "grid.yaml"
    tiny_config["strategies"] = ["full", "last_k"]
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "final: 4 runs x 2 epochs" in out and "No timings" in out
    assert main(["plan", "--config", str(path), "--timings", str(timings_file),
                 "--devices", "2"]) == 0
    out = capsys.readouterr().out
    assert "synthetic@16" in out and "with 2 devices" in out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["plan", "--config", str(path), "--timings", str(bad)]) == 2
    assert "bench_throughput" in capsys.readouterr().err
    assert main(["plan", "--config", str(path), "--seconds-per-iter", "0.4"]) == 0
    assert "0.4 s/iteration" in capsys.readouterr().out
    assert not Path(tiny_config["output_dir"]).exists()  # a plan trains and writes nothing


@pytest.mark.parametrize("tuned", [False, True])
def test_check_compares_the_plan_with_the_runs_in_mlflow(
        tiny_config: dict[str, Any], tmp_path: Path, timings_file: Path, tuned: bool,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--check finds this grid's finished runs (by config_hash, or by dataset and strategy when
    tuned), prices exactly those, and reads their epoch and wall time from the store."""
    from metalr_bench.benchmark.planning.check import check_rows
    from metalr_bench.benchmark.running.runner import run_benchmark
    from mlflow import MlflowClient

    if tuned:
        tiny_config["tune"] = {"enabled": True, "n_trials": 1, "epochs": 1, "pruner": "none"}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["plan", "--config", str(path), "--timings", str(timings_file), "--check"]) == 0
    assert "no finished run of this grid" in capsys.readouterr().out  # nothing ran yet

    cfg = load_config(None, tiny_config)
    outcome = run_benchmark(cfg, progress=False)
    other = load_config(None, {**tiny_config, "seeds": [7], "strategies": ["full"],
                               "tune": {"enabled": False}})
    run_benchmark(other, progress=False)  # same experiment, another grid: must not be counted
    client = MlflowClient(tiny_config["tracking_uri"])
    runs = [client.get_run(r.run_id) for r in outcome.results]
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}

    timings = StepTimings.from_files([timings_file])
    rows = {r.strategy: r for r in check_rows(cfg, timings, client)}
    assert set(rows) == {"full", "last_k"}
    sizes = split_sizes(cfg.datasets[0])
    for strategy, row in rows.items():
        mine = [r for r in runs if r.data.tags["strategy"] == strategy]
        assert row.runs == len(mine) == 2
        assert row.epochs_s == pytest.approx(
            sum(r.data.metrics["mean_epoch_time_s"] * cfg.epochs for r in mine))
        epochs = sum(sum(m.value for m in client.get_metric_history(r.info.run_id,
                                                                    "epoch_time_s"))
                     for r in mine)
        assert row.epochs_s == pytest.approx(epochs)  # the same as the logged epochs
        assert row.wall_s == pytest.approx(
            sum((r.info.end_time - r.info.start_time) / 1000 for r in mine))
        assert row.wall_s > row.epochs_s > 0 and row.overhead_per_run_s > 0
        cell = Cell(dataset=cfg.datasets[0], strategy=strategy, params={}, seed=0)
        one = count_run(cfg, cell, sizes, epochs=cfg.epochs, evaluate_test=False)
        per_run = (one.train_steps * cfg.batch_size * timings.train_s_per_image(cell, 16)
                   + one.forward_images * timings.forward_s_per_image(16))
        assert row.planned_s == pytest.approx(2 * per_run)
        assert row.test_s == pytest.approx(2 * sizes.test * timings.forward_s_per_image(16))
        assert row.overhead_per_run_s == pytest.approx(
            (row.wall_s - row.epochs_s - row.test_s) / 2)

    assert main(["plan", "--config", str(path), "--timings", str(timings_file), "--check"]) == 0
    out = capsys.readouterr().out
    assert "check against 4 finished run(s) of experiment 'test'" in out
    assert "--seconds-per-run" in out


def test_seconds_per_run_is_added_to_every_run(cfg, timings_file: Path) -> None:
    bare = plan_rows(cfg, StepTimings.from_files([timings_file]))
    padded = plan_rows(cfg, StepTimings.from_files([timings_file], per_run_s=2.5))
    for b, p in zip(bare, padded, strict=True):
        assert p.seconds == pytest.approx(b.seconds + 2.5 * b.runs)
    text = format_plan(cfg, padded, StepTimings.from_files([timings_file], per_run_s=2.5))
    assert "plus 2.5 s per run outside training" in text
