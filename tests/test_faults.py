"""Faults: a diverging run fails alone, OOM names the batch size to try, and a tracking server
that goes away does not lose metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fault_strategies import registered
from metalr_bench.benchmark.cli import main
from metalr_bench.benchmark.config import load_config
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.benchmark.tracking.client import MetricsLogger, Tracker
from metalr_bench.benchmark.tracking.retry import RetryPolicy, TrackingError
from metalr_bench.benchmark.training.faults import DivergenceError, check_finite, oom_message
from mlflow import MlflowClient


@pytest.fixture(autouse=True)
def _fault_strategies():
    with registered():
        yield


def test_nan_run_fails_with_reason_and_the_grid_goes_on(tiny_config, tmp_path, capsys):
    data = {**tiny_config, "strategies": ["nan_loss", "full"], "seeds": [0], "epochs": 2}
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["--config", str(config), "--no-progress"]) == 1  # grid done, one failure
    err = capsys.readouterr().err
    assert "FAILED synthetic@16 nan_loss seed=0: DivergenceError" in err
    client = MlflowClient(tracking_uri=tiny_config["tracking_uri"])
    exp = client.get_experiment_by_name("test")
    runs = {r.data.tags.get("strategy"): r for r in client.search_runs([exp.experiment_id])}
    assert runs["nan_loss"].info.status == "FAILED"
    assert "diverged at epoch 1" in runs["nan_loss"].data.tags["failure_reason"]
    assert runs["full"].info.status == "FINISHED"
    assert "test_auc" in runs["full"].data.metrics
    parent = runs[None]
    assert parent.info.status == "FINISHED" and parent.data.tags["n_failed"] == "1"
    # no checkpoint is kept for a failed cell: the next call starts it over
    assert not any((Path(data["output_dir"]) / "checkpoints").glob("*.pt"))


def test_check_finite_names_the_value():
    check_finite(0, {"train_loss": 0.5})
    with pytest.raises(DivergenceError, match=r"epoch 3 \(val_loss=inf\)"):
        check_finite(3, {"train_loss": 0.5, "val_loss": float("inf")})


def test_out_of_memory_suggests_a_smaller_batch(tiny_config):
    cfg = load_config(None, {**tiny_config, "strategies": ["oom"], "seeds": [0]})
    result = run_benchmark(cfg, progress=False).results[0]
    assert result.status == "FAILED"
    assert "OutOfMemory" in result.error and "--batch-size 8" in result.error
    run = MlflowClient(tracking_uri=cfg.tracking_uri).get_run(result.run_id)
    assert "batch_size=16" in run.data.tags["failure_reason"]
    assert oom_message(3, "cuda") .count("--batch-size 2") == 1


class Flaky:
    """Wraps ``client.log_batch``: fails while ``down`` (or for the next ``fail_next`` calls)."""

    def __init__(self, real):
        self.real, self.down, self.fail_next, self.failures = real, False, 0, 0

    def __call__(self, *args, **kwargs):
        if self.down or self.fail_next > 0:
            self.fail_next -= 1
            self.failures += 1
            raise ConnectionError("connection refused (simulated outage)")
        return self.real(*args, **kwargs)


def _tracker(mlflow_uri: str, tmp_path: Path, retry_s: float) -> tuple[Tracker, Flaky, str]:
    tracker = Tracker(mlflow_uri, "faults", retry=RetryPolicy(max_total_s=retry_s, base_s=0.01),
                      fallback_dir=tmp_path / "unlogged")
    run_id = tracker.start_run("r")
    flaky = Flaky(tracker.client.log_batch)
    tracker.client.log_batch = flaky
    return tracker, flaky, run_id


def _history(tracker: Tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, key))


def test_short_outage_is_retried(mlflow_uri, tmp_path):
    tracker, flaky, run_id = _tracker(mlflow_uri, tmp_path, retry_s=5)
    flaky.fail_next = 3
    logger = MetricsLogger(tracker, run_id)
    logger.on_epoch_end(0, {"train_loss": 0.7, "val_auc": 0.6})
    assert flaky.failures == 3
    assert _history(tracker, run_id, "val_auc") == [(0, 0.6)]


def test_outage_over_an_epoch_is_buffered_and_sent_later(mlflow_uri, tmp_path):
    tracker, flaky, run_id = _tracker(mlflow_uri, tmp_path, retry_s=0)
    logger = MetricsLogger(tracker, run_id)
    flaky.down = True
    logger.on_epoch_end(0, {"train_loss": 0.7})  # does not raise: training goes on
    flaky.down = False
    logger.on_epoch_end(1, {"train_loss": 0.5})
    logger.flush(final=True)
    assert _history(tracker, run_id, "train_loss") == [(0, 0.7), (1, 0.5)]


def test_lasting_outage_fails_loudly_and_saves_what_was_not_logged(mlflow_uri, tmp_path, capsys):
    tracker, flaky, run_id = _tracker(mlflow_uri, tmp_path, retry_s=0.05)
    logger = MetricsLogger(tracker, run_id)
    flaky.down = True
    logger.on_epoch_end(0, {"train_loss": 0.7, "val_auc": 0.6})
    logger.on_epoch_end(1, {"train_loss": 0.5, "val_auc": 0.8})
    with pytest.raises(TrackingError) as info:
        logger.flush(final=True)
    msg = str(info.value)
    path = tmp_path / "unlogged" / f"{run_id}.jsonl"
    assert "4 metric(s)" in msg and "train_loss@0" in msg and "val_auc@1" in msg
    assert str(path) in msg and "replay-metrics" in msg
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {(d["key"], d["step"], d["value"]) for d in lines} == {
        ("train_loss", 0, 0.7), ("val_auc", 0, 0.6), ("train_loss", 1, 0.5), ("val_auc", 1, 0.8)}
    # the server is back: the documented replay command logs them
    assert main(["replay-metrics", str(path), "--tracking-uri", mlflow_uri]) == 0
    assert "4 metric(s) logged" in capsys.readouterr().out
    assert _history(tracker, run_id, "val_auc") == [(0, 0.6), (1, 0.8)]
