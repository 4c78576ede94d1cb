"""Issue 26: quiet when asked, observable in MLflow, nothing lost mid-cell.

Each test drives real components: a real ``run-benchmark`` process, real SQLite MLflow stores,
real worker processes, a real ``mlflow server`` on 127.0.0.1. Configs are the tiniest that still
exercise the path (smallcnn, synthetic data, 1-3 epochs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

TESTS = Path(__file__).resolve().parent


def _config(tmp_path: Path, cfg: dict[str, Any], name: str = "bench.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(config: Path, *flags: str, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    """``run-benchmark --config <config> <flags>`` in a fresh process, stdout and stderr apart."""
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import fault_strategies as f; "
            "f.register_all(); from metalr_bench.benchmark.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.run(
        [sys.executable, "-c", code, str(TESTS), "--config", str(config), *flags],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
        text=True, timeout=timeout,
    )


# -- --no-progress: every progress line, pre-training included; results alone on stdout -------
def _store(root: Path, template: Path) -> str:
    """A pre-migrated SQLite store in ``root`` (a fresh process would spend seconds migrating)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, root / "mlflow.db")
    return f"sqlite:///{root / 'mlflow.db'}"


def _pretraining(tiny_config: dict[str, Any], root: Path, template: Path) -> dict[str, Any]:
    return {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1,
            "tracking_uri": _store(root, template), "output_dir": str(root / "out"),
            "model": {"arch": "smallcnn", "weights": "pretrain",
                      "pretrain": {"epochs": 2, "batch_size": 32, "options": {"n_images": 64}}}}


#: progress lines, and MLflow's per-run INFO lines of its system-metrics monitor ("Started
#: monitoring system metrics", "Skip logging GPU metrics"), which printed for every run
PROGRESS_MARKS = ("epoch 1/2", "pretrain smallcnn", "it/s", "run/s", "%|", "\r",
                  "monitoring system metrics", "Skip logging GPU metrics")


def test_no_progress_silences_pretraining_and_stdout_holds_only_results(tiny_config, tmp_path,
                                                                        _mlflow_template):
    quiet = _cli(_config(tmp_path, _pretraining(tiny_config, tmp_path / "quiet",
                                                _mlflow_template)),
                 "--no-progress")
    assert quiet.returncode == 0, quiet.stderr
    for mark in PROGRESS_MARKS:  # the pre-training stage's epoch lines used to print here
        assert mark not in quiet.stderr, (mark, quiet.stderr)
        assert mark not in quiet.stdout, (mark, quiet.stdout)
    # stdout: the results only (what `> results.txt` keeps)
    assert quiet.stdout.lstrip().startswith("Leaderboard"), quiet.stdout
    assert "synthetic@16" in quiet.stdout and "MLflow: experiment" in quiet.stdout
    assert "run-benchmark: 1 runs" in quiet.stderr  # what it is about to do: stderr

    loud = _cli(_config(tmp_path, _pretraining(tiny_config, tmp_path / "loud", _mlflow_template),
                        "loud.yaml"))
    assert loud.returncode == 0, loud.stderr
    assert "epoch 1/2" in loud.stderr and "epoch 2/2" in loud.stderr  # progress: stderr
    for mark in PROGRESS_MARKS:
        assert mark not in loud.stdout, (mark, loud.stdout)
    assert loud.stdout.lstrip().startswith("Leaderboard"), loud.stdout


# -- warnings from worker processes print as the driver's do ----------------------------------
WARNING_TEXT = "/data/pneumoniamnist.npz: MD5 abc is not the official\n  def; accepted"


def _warn_in_workers(executor: Any, tiny_config: dict[str, Any]) -> list[str]:
    from fault_strategies import warn_and_capture
    from metalr_bench.benchmark.config import load_config
    from metalr_bench.benchmark.tracking.client import Tracker
    from tqdm import tqdm

    cfg = load_config(None, {**tiny_config, "seeds": [0], "strategies": ["full"]})
    Tracker(cfg.tracking_uri, cfg.name)  # the experiment exists before the workers look it up
    with tqdm(disable=True) as bar:
        return executor.map_calls(warn_and_capture, cfg, cfg.tracking_uri,
                                  [(WARNING_TEXT,), (WARNING_TEXT,)], labels=["a", "b"], bar=bar)


def _one_line(shown: str) -> None:
    assert shown == ("run-benchmark: warning: /data/pneumoniamnist.npz: MD5 abc is not the "
                     "official def; accepted\n"), shown
    assert "DatasetWarning" not in shown and ".py:" not in shown  # never Python's raw format


def test_warnings_in_local_workers_are_one_line(tiny_config):
    from metalr_bench.benchmark.config import load_config
    from metalr_bench.benchmark.running.executors import LocalExecutor

    executor = LocalExecutor(load_config(None, {**tiny_config, "executor": "local",
                                                "workers": 2}))
    for shown in _warn_in_workers(executor, tiny_config):
        _one_line(shown)


def test_warnings_in_ray_tasks_are_one_line(tiny_config):
    ray = pytest.importorskip("ray")
    from metalr_bench.benchmark.config import load_config
    from metalr_bench.benchmark.running.executors import RayExecutor

    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})  # workers import fault_strategies
    try:
        executor = RayExecutor(load_config(None, {**tiny_config, "executor": "ray"}))
        for shown in _warn_in_workers(executor, tiny_config):
            _one_line(shown)
    finally:
        ray.shutdown()


# -- system metrics in MLflow ------------------------------------------------------------------
@pytest.mark.parametrize("on", [True, False])
def test_every_training_run_logs_system_metrics_unless_turned_off(tiny_config, on):
    from metalr_bench.benchmark.config import load_config
    from metalr_bench.benchmark.running.runner import run_benchmark
    from mlflow import MlflowClient

    cfg = load_config(None, {**tiny_config, "seeds": [0], "strategies": ["full"],
                             "system_metrics": on, "system_metrics_interval_s": 0.2,
                             "model": {"arch": "smallcnn", "weights": "pretrain", "pretrain": {
                                 "epochs": 1, "batch_size": 32, "options": {"n_images": 64}}}})
    outcome = run_benchmark(cfg, progress=False)
    assert [r.status for r in outcome.results] == ["FINISHED"]
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    training = [r for kind in ("cell", "pretrain")
                for r in client.search_runs([exp.experiment_id], f"tags.kind = '{kind}'")]
    assert {r.data.tags["kind"] for r in training} == {"cell", "pretrain"}
    for run in training:
        system = {k for k in run.data.metrics if k.startswith("system/")}
        if not on:
            assert system == set(), system
            continue
        assert {"system/cpu_utilization_percentage",
                "system/system_memory_usage_megabytes"} <= system, system
        memory = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
        assert memory and all(0 < m.value < 1e8 for m in memory)  # MB of this host, sampled
    parent = client.get_run(outcome.parent_run_id)
    assert not [k for k in parent.data.metrics if k.startswith("system/")]  # not a training run
    # the report's cost section: peak memory from the system metrics, else peak_memory_mb
    from metalr_bench.reports.results import load_runs, results_table, with_peak_memory

    (row,) = with_peak_memory(cfg.tracking_uri, results_table(
        load_runs(cfg.tracking_uri, cfg.name))).to_dict("records")
    (cell,) = [r for r in training if r.data.tags["kind"] == "cell"]
    if on:
        history = client.get_metric_history(cell.info.run_id,
                                            "system/system_memory_usage_megabytes")
        assert row["peak_memory_mb"] == max(m.value for m in history)
        assert row["peak_memory_source"] == "system/system_memory_usage_megabytes"
    else:
        assert row["peak_memory_mb"] == cell.data.metrics["peak_memory_mb"]
        assert row["peak_memory_source"] == "peak_memory_mb"


# -- datasets in MLflow's own terms ----------------------------------------------------------
def test_runs_log_their_splits_as_mlflow_dataset_inputs(tiny_config, tmp_path):
    import numpy as np
    from metalr_bench.benchmark.config import load_config
    from metalr_bench.benchmark.running.runner import run_benchmark
    from mlflow import MlflowClient
    from PIL import Image
    from test_folder import PATTERN, make_folder

    files = make_folder(tmp_path / "us", videos=4, frames=2, sizes=((16, 16),))
    cfg = load_config(None, {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1,
                             "system_metrics": False,
                             "datasets": [{"adapter": "imagefolder", "root": str(tmp_path / "us"),
                                           "size": 16,
                                           "options": {"group_pattern": PATTERN}}]})
    client = MlflowClient(tracking_uri=cfg.tracking_uri)

    def inputs_of(run_id: str) -> list[Any]:
        return client.get_run(run_id).inputs.dataset_inputs

    (first,) = run_benchmark(cfg, progress=False).results
    inputs = inputs_of(first.run_id)
    contexts = sorted(t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context")
    assert contexts == ["test", "train", "val"]
    (dataset,) = {(i.dataset.name, json.loads(i.dataset.profile)["content_digest"],
                   i.dataset.source_type, i.dataset.source) for i in inputs}
    name, digest, source_type, source = dataset
    assert len({i.dataset.digest for i in inputs}) == 3  # one per split
    assert name == cfg.cells()[0].dataset.dataset_key and source_type == "local"
    assert (tmp_path / "us").resolve().as_uri() in source
    profile = json.loads(inputs[0].dataset.profile)
    assert profile["num_train"] + profile["num_val"] + profile["num_test"] == len(files)

    # one image edited: the next run's digest differs, the first run keeps its own
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(files[0])
    (second,) = run_benchmark(cfg.model_copy(update={"force": True}), progress=False).results
    assert second.run_id != first.run_id
    def digests(run_id: str) -> set[str]:
        return {json.loads(i.dataset.profile)["content_digest"] for i in inputs_of(run_id)}

    assert digests(second.run_id) != {digest}
    assert digests(first.run_id) == {digest}
    assert not {i.dataset.digest for i in inputs} & {i.dataset.digest
                                                     for i in inputs_of(second.run_id)}

    # data generated in code: the generator's settings are the digest
    synth = load_config(None, {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1,
                               "system_metrics": False, "name": "synth"})
    (run,) = run_benchmark(synth, progress=False).results
    (ds,) = {(i.dataset.name, i.dataset.source_type) for i in inputs_of(run.run_id)}
    assert ds == ("synthetic@16", "code")


# -- nothing lost: kill -9 in the middle of an epoch ---------------------------------------------
FINAL = ("test_auc", "test_acc", "test_balanced_acc", "test_f1", "best_val_auc", "best_epoch")


def _runs(uri: str, name: str) -> list[Any]:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    return list(client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL))


def _cells(uri: str, name: str) -> list[Any]:
    return [r for r in _runs(uri, name) if r.data.tags.get("kind") == "cell"]


def _straight(cfg_dict: dict[str, Any], root: Path, template: Path) -> dict[str, float]:
    """The same cell trained in one go, in this process."""
    from metalr_bench.benchmark.config import load_config
    from metalr_bench.benchmark.running.runner import run_benchmark

    cfg = load_config(None, {**cfg_dict, "tracking_uri": _store(root, template),
                             "output_dir": str(root / "out")})
    (result,) = run_benchmark(cfg, progress=False).results
    return result.summary


def test_kill_9_mid_epoch_resumes_the_cell_to_the_uninterrupted_result(tiny_config, tmp_path,
                                                                       _mlflow_template):
    from metalr_bench.benchmark.cli import main
    from metalr_bench.benchmark.config import load_config
    from metalr_bench.benchmark.training.checkpoint import CellCheckpoint
    from mlflow import MlflowClient

    base = {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 2,
            "deterministic": True, "system_metrics": False}
    data = {**base, "tracking_uri": _store(tmp_path / "killed", _mlflow_template),
            "output_dir": str(tmp_path / "killed" / "out")}
    config = _config(tmp_path, data)
    cfg = load_config(config)
    ckpt = CellCheckpoint(Path(cfg.output_dir) / "checkpoints", cfg.config_hash(cfg.cells()[0]))

    # epoch 0 done and checkpointed, then kill -9 after the first batch of epoch 1
    killed = _cli(config, "--no-progress", env={"METALR_BENCH_KILL_AT": "1:1"})
    assert killed.returncode == -9, killed.stderr
    assert ckpt.load()["trainer"]["epoch"] == 0
    (child,) = _cells(cfg.tracking_uri, cfg.name)
    assert child.info.status == "RUNNING"  # nothing could run after kill -9

    assert main(["--config", str(config), "--no-progress"]) == 0  # the same command again
    assert "RUNNING" not in {r.info.status for r in _runs(cfg.tracking_uri, cfg.name)}
    (resumed,) = _cells(cfg.tracking_uri, cfg.name)  # the same run, not a duplicate
    assert resumed.info.run_id == child.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from_epoch"] == "0"
    history = MlflowClient(tracking_uri=cfg.tracking_uri).get_metric_history(
        resumed.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [0, 1]  # each epoch once
    assert not ckpt.exists()
    straight = _straight(base, tmp_path / "straight", _mlflow_template)
    for k in FINAL:
        assert resumed.data.metrics[k] == pytest.approx(straight[k], abs=1e-6), k


# -- nothing lost: the tracking server goes away mid-run -----------------------------------------
class _Proc:
    """A run-benchmark process whose stderr lines are collected as they come."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        import threading

        code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import fault_strategies as f; "
                "f.register_all(); from metalr_bench.benchmark.cli import main; "
                "sys.exit(main(sys.argv[1:]))")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(TESTS), "--config", str(config), "--no-progress"],
            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, f"no {text!r} in:\n{''.join(self.lines)}"
            time.sleep(0.1)

    def wait(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.thread.join(timeout=10)
        return rc


def _wait_for_checkpoint(ckpt: Any, proc: _Proc, epoch: int) -> None:
    import time

    deadline = time.monotonic() + 180
    while (payload := ckpt.load()) is None or payload["trainer"]["epoch"] < epoch:
        assert proc.proc.poll() is None, "".join(proc.lines)
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)


@pytest.fixture
def fault_strategies():
    from fault_strategies import registered

    with registered():
        yield


@pytest.mark.slow
def test_tracking_server_outage_retried_or_stopped_then_resumed(tiny_config, tmp_path,
                                                               mlflow_uri, monkeypatch,
                                                               fault_strategies):
    """A real ``mlflow server`` stopped mid-run. Back within the retry budget: the run finishes
    with every epoch's metrics. Away for longer: one error line, exit 3; the same command, once
    the server is back, resumes the cell in its run and finishes it."""
    from contextlib import ExitStack

    from metalr_bench.benchmark.cli import main
    from metalr_bench.benchmark.config import load_config
    from metalr_bench.benchmark.tracking.server import free_port, local_server
    from metalr_bench.benchmark.training.checkpoint import CellCheckpoint
    from mlflow import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    base = {**tiny_config, "seeds": [0], "strategies": ["sleepy"], "epochs": 3,
            "system_metrics": False, "tracking_uri": uri}
    server = ExitStack()
    server.enter_context(local_server(mlflow_uri, port=port))
    try:
        # 1. back within the retry budget
        config = _config(tmp_path, {**base, "name": "back", "tracking_retry_s": 300,
                                    "output_dir": str(tmp_path / "back")}, "back.yaml")
        cfg = load_config(config)
        ckpt = CellCheckpoint(Path(cfg.output_dir) / "checkpoints",
                              cfg.config_hash(cfg.cells()[0]))
        proc = _Proc(config, {"SLEEPY_S": "3"})
        _wait_for_checkpoint(ckpt, proc, 0)
        server.close()  # the server goes away while epoch 1 trains
        proc.wait_for("retrying")  # epoch 1's metrics could not be sent
        server.enter_context(local_server(mlflow_uri, port=port))  # back, same store
        assert proc.wait() == 0, "".join(proc.lines)
        client = MlflowClient(tracking_uri=uri)
        (cell,) = _cells(uri, "back")
        assert cell.info.status == "FINISHED"
        for key in ("train_loss", "val_loss", "val_auc"):  # no metric lost, none twice
            assert sorted(m.step for m in client.get_metric_history(cell.info.run_id, key)) \
                == [0, 1, 2], key
        assert "test_auc" in cell.data.metrics
        assert "RUNNING" not in {r.info.status for r in _runs(uri, "back")}

        # 2. away for longer than the retry budget
        config = _config(tmp_path, {**base, "name": "away", "tracking_retry_s": 2,
                                    "output_dir": str(tmp_path / "away")}, "away.yaml")
        cfg = load_config(config)
        ckpt = CellCheckpoint(Path(cfg.output_dir) / "checkpoints",
                              cfg.config_hash(cfg.cells()[0]))
        proc = _Proc(config, {"SLEEPY_S": "3"})
        _wait_for_checkpoint(ckpt, proc, 0)
        server.close()
        assert proc.wait() == 3, "".join(proc.lines)
        errors = [line for line in proc.lines if line.startswith("run-benchmark: error: ")]
        assert len(errors) == 1, proc.lines
        assert "tracking server unreachable" in errors[0]
        assert "run the same command to resume" in errors[0]
        assert not any("Traceback" in line for line in proc.lines), "".join(proc.lines)
        assert ckpt.exists()  # kept for the resume

        server.enter_context(local_server(mlflow_uri, port=port))
        monkeypatch.setenv("SLEEPY_S", "0")
        for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            monkeypatch.setenv(var, os.environ.get(var, "1" if "RETRIES" in var else "30"))
        assert main(["--config", str(config), "--no-progress"]) == 0  # the same command
        runs = _runs(uri, "away")
        assert "RUNNING" not in {r.info.status for r in runs}
        (cell,) = _cells(uri, "away")  # resumed in its run, not duplicated
        assert cell.info.status == "FINISHED" and "resumed_from_epoch" in cell.data.tags
        for key in ("train_loss", "val_loss"):
            assert sorted(m.step for m in client.get_metric_history(cell.info.run_id, key)) \
                == [0, 1, 2], key
    finally:
        server.close()


# -- nothing lost: several local workers on one SQLite store -----------------------------------
@pytest.mark.slow
def test_four_local_workers_on_one_sqlite_store_never_lock(tiny_config, capfd):
    """4 worker processes, one SQLite file: the driver puts an ``mlflow server`` in front of it
    (:mod:`tracking.server`), so no process writes the file but the server; system metrics every
    0.5 s add to the writes. Every cell lands once, and "database is locked" appears nowhere
    (workers' stderr, the driver's log, the server's log)."""
    from metalr_bench.benchmark.config import load_config
    from metalr_bench.benchmark.running.runner import run_benchmark

    cfg = load_config(None, {**tiny_config, "epochs": 1, "executor": "local", "workers": 4,
                             "system_metrics_interval_s": 0.5})
    outcome = run_benchmark(cfg, progress=False)
    assert [r.status for r in outcome.results] == ["FINISHED"] * 4, [r.error for r in
                                                                     outcome.results]
    cells = _cells(cfg.tracking_uri, cfg.name)
    assert len(cells) == 4 and {r.info.status for r in cells} == {"FINISHED"}
    assert len({(r.data.tags["strategy"], r.data.tags["seed"]) for r in cells}) == 4
    server_log = Path(cfg.tracking_uri[len("sqlite:///"):]).parent / "mlflow-server.log"
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, server_log.read_text()):
        assert "database is locked" not in text.lower()
    # MLflow prints "🏃 View run <name> at: http://…" and "🧪 View experiment at" on stdout for
    # every run it ends over HTTP: 2 lines per run and trial, in the middle of the results
    for text in (captured.out, captured.err):
        assert "View run" not in text and "View experiment" not in text, text[-2000:]


def test_dataset_inputs_survive_two_workers_creating_the_same_dataset(mlflow_uri, monkeypatch,
                                                                      caplog):
    """Two local workers logging the same dataset through one `mlflow server` race in the
    store's get-or-create of the dataset row; the loser got "UNIQUE constraint failed:
    datasets..." and its cell FAILED (test_executors' two-worker test failed so). The store's
    error is retried (the retry finds the winner's row); a persisting one leaves the inputs out
    with a warning; any other error still propagates."""
    from metalr_bench.benchmark.tracking.client import Tracker
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST, RESOURCE_DOES_NOT_EXIST

    tracker = Tracker(mlflow_uri, "race")
    calls: list[int] = []

    def racing(run_id, datasets):  # the first call loses the race, the second finds the row
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint "
                                  "failed: datasets.experiment_id, datasets.name, datasets.digest",
                                  error_code=BAD_REQUEST)  # as the server's RestException

    monkeypatch.setattr(tracker.client, "log_inputs", racing)
    tracker.log_inputs("run", ["input"])
    assert len(calls) == 2

    def always(run_id, datasets):
        raise MlflowException("UNIQUE constraint failed: datasets.name", error_code=BAD_REQUEST)

    monkeypatch.setattr(tracker.client, "log_inputs", always)
    with caplog.at_level("WARNING"):
        tracker.log_inputs("run", ["input"])
    assert "dataset inputs were not logged" in caplog.text

    def other(run_id, datasets):
        raise MlflowException("run 'run' not found", error_code=RESOURCE_DOES_NOT_EXIST)

    monkeypatch.setattr(tracker.client, "log_inputs", other)
    with pytest.raises(MlflowException, match="not found"):
        tracker.log_inputs("run", ["input"])


def test_a_run_shorter_than_the_sampling_interval_still_logs_its_system_metrics(mlflow_uri):
    """MLflow's monitor drops the samples of an interval cut short by ``finish()``: a run shorter
    than ``system_metrics_interval_s`` logged no ``system/`` metric (the system-metrics test
    failed so once on a loaded host). The samples collected are published at the end."""
    from metalr_bench.benchmark.tracking.client import Tracker
    from mlflow import MlflowClient

    tracker = Tracker(mlflow_uri, "short")
    with tracker.run("short", system_metrics=60.0) as run_id:
        pass  # over long before the first 60 s interval ends
    metrics = MlflowClient(mlflow_uri).get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics, metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_runs_name_the_cpu_and_its_kernels() -> None:
    """Two hosts gave the quick benchmark different tables from the same commit (BENCHMARKS,
    "the host moved, not the code"): the parent run and the throughput script name the CPU and
    the kernel set torch picked (AVX2 / AVX512 / ...), so a reader can tell hosts apart."""
    import torch
    from metalr_bench.benchmark.perf.bench_throughput import device_name
    from metalr_bench.benchmark.running.runner import environment_tags

    capability = torch.backends.cpu.get_cpu_capability()
    assert capability in environment_tags()["cpu"]
    assert capability in device_name("cpu")
