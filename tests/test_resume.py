"""Resume and idempotency: skip FINISHED cells, re-run FAILED/KILLED ones, resume from the
last epoch's checkpoint with the same final numbers, and never leave a run RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fault_strategies import InterruptOnce, registered
from metalr_bench.benchmark.cli import main
from metalr_bench.benchmark.config import load_config
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.benchmark.training.checkpoint import CellCheckpoint
from mlflow import MlflowClient
from mlflow.entities import ViewType

TESTS = Path(__file__).resolve().parent
FINAL = ("test_auc", "test_acc", "test_balanced_acc", "test_f1", "best_val_auc", "best_epoch")


@pytest.fixture(autouse=True)
def _fault_strategies():
    with registered():
        yield


def _runs(uri: str, name: str) -> list[Any]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    return list(client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL))


def _children(uri: str, name: str) -> list[Any]:
    return [r for r in _runs(uri, name) if "config_hash" in r.data.tags]


def _with_dirs(cfg: dict[str, Any], root: Path) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    return {**cfg, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "output_dir": str(root / "out")}


def test_rerun_skips_finished_and_force_reruns(tiny_config):
    cfg = load_config(None, {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1})
    first = run_benchmark(cfg, progress=False)
    assert [r.status for r in first.results] == ["FINISHED"]
    second = run_benchmark(cfg, progress=False)
    assert all(r.skipped and r.status == "FINISHED" for r in second.results)
    assert [r.run_id for r in second.results] == [r.run_id for r in first.results]
    assert second.results[0].summary["test_auc"] == first.results[0].summary["test_auc"]
    assert len(_children(cfg.tracking_uri, cfg.name)) == 1  # nothing trained again
    forced = run_benchmark(cfg.model_copy(update={"force": True}), progress=False)
    assert not any(r.skipped for r in forced.results)
    assert len(_children(cfg.tracking_uri, cfg.name)) == 2
    assert not (Path(cfg.output_dir) / "checkpoints").exists() or not any(
        (Path(cfg.output_dir) / "checkpoints").iterdir())


def test_changed_config_is_a_new_cell(tiny_config):
    cfg = load_config(None, {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1})
    run_benchmark(cfg, progress=False)
    again = run_benchmark(cfg.model_copy(update={"lr": 2e-3}), progress=False)
    assert not again.results[0].skipped


def test_ctrl_c_marks_killed_keeps_checkpoint_and_resumes_exactly(tiny_config, tmp_path):
    base = {**tiny_config, "seeds": [0], "strategies": ["interrupt_once"], "epochs": 3,
            "deterministic": True}
    cfg = load_config(None, _with_dirs(base, tmp_path / "a"))
    InterruptOnce.armed = True
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg, progress=False)
    runs = _runs(cfg.tracking_uri, cfg.name)
    assert {r.info.status for r in runs} == {"KILLED"}  # parent and child
    cell = cfg.cells()[0]
    ckpt = CellCheckpoint(Path(cfg.output_dir) / "checkpoints", cfg.config_hash(cell))
    payload = ckpt.load()
    assert payload is not None and payload["trainer"]["epoch"] == 0
    killed_child = _children(cfg.tracking_uri, cfg.name)[0].info.run_id

    resumed = run_benchmark(cfg, progress=False).results[0]
    assert resumed.status == "FINISHED" and resumed.run_id == killed_child  # same run reopened
    assert not ckpt.exists()
    straight = run_benchmark(load_config(None, _with_dirs(base, tmp_path / "b")),
                             progress=False).results[0]
    for k in FINAL:
        assert resumed.summary[k] == pytest.approx(straight.summary[k], abs=1e-6), k
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    history = client.get_metric_history(killed_child, "val_loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert client.get_run(killed_child).data.tags["resumed_from_epoch"] == "0"


def test_corrupt_checkpoint_starts_over(tiny_config):
    cfg = load_config(None, {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1})
    ckpt = CellCheckpoint(Path(cfg.output_dir) / "checkpoints", cfg.config_hash(cfg.cells()[0]))
    ckpt.path.parent.mkdir(parents=True)
    ckpt.path.write_bytes(b"PK\x03\x04 truncated")
    assert ckpt.load() is None
    assert run_benchmark(cfg, progress=False).results[0].status == "FINISHED"


def _subprocess_cli(config: Path, env: dict[str, str]) -> subprocess.Popen:
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv.pop(1)); import fault_strategies as f; "
        f"f.register_all(); torch.set_num_threads({torch.get_num_threads()}); "
        "from metalr_bench.benchmark.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(TESTS), "--config", str(config), "--no-progress"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_epoch(ckpt: CellCheckpoint, proc: subprocess.Popen, epoch: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"benchmark ended early:\n{proc.stdout.read()}"
        payload = ckpt.load()
        if payload is not None and payload["trainer"]["epoch"] >= epoch:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint within 120 s")


_STRAIGHT: dict[str, dict[str, float]] = {}


def _uninterrupted(base: dict[str, Any], factory: pytest.TempPathFactory) -> dict[str, float]:
    """The same cell trained in one go (once per session; both kill tests compare to it)."""
    if "sleepy" not in _STRAIGHT:
        cfg = load_config(None, _with_dirs(base, factory.mktemp("straight")))
        _STRAIGHT["sleepy"] = run_benchmark(cfg, progress=False).results[0].summary
    return _STRAIGHT["sleepy"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_subprocess_resumes_to_the_uninterrupted_result(tiny_config, tmp_path, sig,
                                                                tmp_path_factory):
    base = {**tiny_config, "seeds": [0], "strategies": ["sleepy"], "epochs": 3,
            "deterministic": True}
    data = _with_dirs(base, tmp_path / "killed")
    config = tmp_path / "killed" / "bench.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_config(config)
    ckpt = CellCheckpoint(Path(cfg.output_dir) / "checkpoints", cfg.config_hash(cfg.cells()[0]))

    proc = _subprocess_cli(config, {"SLEEPY_S": "60"})
    _wait_for_epoch(ckpt, proc, 0)  # epoch 0 done and checkpointed; asleep before epoch 1
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    out = proc.stdout.read()
    statuses = {r.info.status for r in _runs(cfg.tracking_uri, cfg.name)}
    if sig == signal.SIGTERM:  # a clean stop: runs marked KILLED, exit 143
        assert rc == 143, out
        assert "run the same command again to resume" in out
        assert statuses == {"KILLED"}
    else:  # SIGKILL: nothing can run; the runs stay RUNNING until the next call
        assert rc == -signal.SIGKILL
        assert statuses == {"RUNNING"}
    assert ckpt.load()["trainer"]["epoch"] == 0

    assert main(["--config", str(config), "--no-progress"]) == 0  # resumes in this process
    runs = _runs(cfg.tracking_uri, cfg.name)
    assert "RUNNING" not in {r.info.status for r in runs}
    children = _children(cfg.tracking_uri, cfg.name)
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].data.tags["resumed_from_epoch"] == "0"
    resumed = children[0].data.metrics
    straight = _uninterrupted(base, tmp_path_factory)
    for k in FINAL:
        assert resumed[k] == pytest.approx(straight[k], abs=1e-6), k


def _orphan(cfg: Any, beat_age_s: float | None) -> str:
    """A RUNNING run of the grid's first cell, as a worker on another machine leaves it."""
    from metalr_bench.benchmark.tracking import heartbeat

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.name)
    tags = {"config_hash": cfg.config_hash(cfg.cells()[0]), "run.host": "gpu-node-7",
            "run.pid": "4242"}
    if beat_age_s is not None:
        tags[heartbeat.TAG] = f"{time.time() - beat_age_s:.0f}"
    return client.create_run(exp_id, tags=tags).info.run_id


@pytest.mark.parametrize("beat_age_s, dead", [(None, False), (60.0, False), (1800.0, True)])
def test_runs_of_another_host_are_stale_when_their_heartbeat_stops(tiny_config, beat_age_s,
                                                                    dead):
    cfg = load_config(None, {**tiny_config, "seeds": [0], "strategies": ["full"]})
    orphan = _orphan(cfg, beat_age_s)
    (result,) = run_benchmark(cfg, progress=False).results
    run = MlflowClient(tracking_uri=cfg.tracking_uri).get_run(orphan)
    if dead:  # silent for 30 min: killed, and the cell trained again
        assert run.info.status == "KILLED"
        assert run.data.tags["failure_reason"] == ("no heartbeat from gpu-node-7 for 30 min "
                                                   "(found stale)")
        assert result.status == "FINISHED" and not result.skipped
        fresh = MlflowClient(tracking_uri=cfg.tracking_uri).get_run(result.run_id)
        assert float(fresh.data.tags["run.heartbeat"]) == pytest.approx(time.time(), abs=300)
    else:  # beating a minute ago, or a run without heartbeats: may be alive, left alone
        assert run.info.status == "RUNNING"
        assert result.skipped and result.status == "RUNNING"
        assert f"run {orphan} is still RUNNING on gpu-node-7 (pid 4242" in result.error
        assert f"mlflow runs delete --run-id {orphan}" in result.error


def test_every_run_beats_while_its_block_runs_and_stops_after(mlflow_uri, monkeypatch):
    """`Tracker.run` is the one lifecycle: owner tags and a heartbeat for every kind of run."""
    from metalr_bench.benchmark.tracking import heartbeat
    from metalr_bench.benchmark.tracking.client import Tracker

    monkeypatch.setattr(heartbeat, "INTERVAL_S", 0.2)
    tracker = Tracker(mlflow_uri, "beats")
    client = tracker.client
    beats: set[str] = set()
    with tracker.run("pretrain-x", tags={"kind": "pretrain"}) as run_id:
        tags = client.get_run(run_id).data.tags
        assert tags["run.host"] and tags["run.pid"] == str(os.getpid())
        deadline = time.time() + 20
        while len(beats) < 2 and time.time() < deadline:  # the tag holds whole seconds
            beats |= {client.get_run(run_id).data.tags.get(heartbeat.TAG)} - {None}
            time.sleep(0.5)
    assert len(beats) >= 2  # refreshed, not written once
    assert client.get_run(run_id).info.status == "FINISHED"
    import threading

    assert not [t for t in threading.enumerate() if t.name == f"heartbeat-{run_id[:8]}"]


@pytest.mark.slow
def test_kill_9_during_pretraining_leaves_no_running_run(tiny_config, tmp_path) -> None:
    """A user's `kill -9` of the quick benchmark during its pre-training stage, then the same
    command again: the re-run used to mark the old parent KILLED and finish, but the killed
    pre-training run (no owner tags, no heartbeat, not searched) stayed RUNNING forever."""
    data = _with_dirs({**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1,
                       "model": {"arch": "smallcnn", "weights": "pretrain",
                                 "pretrain": {"epochs": 400, "batch_size": 64,
                                              "options": {"n_images": 64}}}},
                      tmp_path / "pre")
    config = tmp_path / "pre" / "bench.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_config(config)
    client = MlflowClient(tracking_uri=cfg.tracking_uri)

    proc = _subprocess_cli(config, {})
    deadline = time.monotonic() + 120
    pre: list[Any] = []
    while not pre:  # pre-training has started and logged an epoch: kill it there
        assert proc.poll() is None, f"benchmark ended early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no pre-training run within 120 s"
        time.sleep(0.1)
        exp = client.get_experiment_by_name(cfg.name)
        if exp is not None:
            pre = [r for r in client.search_runs([exp.experiment_id], "tags.kind = 'pretrain'")
                   if r.info.status == "RUNNING" and "train_loss" in r.data.metrics]
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed = pre[0].info.run_id
    assert client.get_run(killed).info.status == "RUNNING"

    assert main(["--config", str(config), "--no-progress"]) == 0  # the same command again
    runs = _runs(cfg.tracking_uri, cfg.name)
    assert "RUNNING" not in {r.info.status for r in runs}, [
        (r.data.tags.get("kind"), r.info.status) for r in runs]
    old = client.get_run(killed)
    assert old.info.status == "KILLED"
    assert "process died" in old.data.tags["failure_reason"]
    fresh = [r for r in runs if r.data.tags.get("kind") == "pretrain" and r.info.run_id != killed]
    assert len(fresh) == 1 and fresh[0].info.status == "FINISHED"


def test_a_busy_cell_is_reported_as_busy_not_failed(tiny_config, tmp_path, capsys) -> None:
    """A cell another live process is running is not a failure of this command: it says BUSY
    (with who holds it), keeps FAILED for cells that failed, and exits 4 ("incomplete: run the
    same command again later"), not 1. It said `FAILED ... is still RUNNING` and exited 1."""
    import yaml
    from metalr_bench.benchmark.cli import main

    conf = {**tiny_config, "seeds": [0], "strategies": ["full"]}
    path = tmp_path / "busy.yaml"
    path.write_text(yaml.safe_dump(conf))
    orphan = _orphan(load_config(None, conf), 60.0)  # beating a minute ago: alive
    rc = main(["--config", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert "FAILED" not in err
    assert f"BUSY synthetic@16 full seed=0: run {orphan} is still RUNNING" in err
    assert "1 cell(s) held by another process" in err
    assert rc == 4
