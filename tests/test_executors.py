"""Executors: local processes and Ray land every cell exactly once under one parent run in a
real ``mlflow server``; parallel Optuna workers fill studies exactly."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from metalr_bench.benchmark.config import ConfigError, load_config
from metalr_bench.benchmark.runner import run_benchmark
from metalr_bench.benchmark.tracking_server import (
    TrackingServerError,
    check_reachable,
    free_port,
    local_server,
)
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID


@pytest.fixture
def mlflow_server(mlflow_uri: str):
    """A real ``mlflow server`` on 127.0.0.1 over a copied, pre-migrated SQLite store."""
    with local_server(mlflow_uri) as uri:
        yield uri


def assert_grid_landed(uri: str, experiment: str, parent_id: str,
                       expected: set[tuple[str, int]], check_artifacts: bool = True) -> None:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
        max_results=100,
    )
    keys = Counter((r.data.tags["strategy"], int(r.data.tags["seed"])) for r in children)
    assert keys == Counter(expected), keys  # every cell exactly once
    assert {r.info.status for r in children} == {"FINISHED"}
    for r in children:
        assert "test_auc" in r.data.metrics and "val_loss" in r.data.metrics
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["n_failed"] == "0"
    if check_artifacts:  # the parent's artifacts went through the server's artifact proxy
        assert {a.path for a in client.list_artifacts(parent_id)} >= {"config.json"}


GRID = {("full", 0), ("full", 1), ("last_k", 0), ("last_k", 1)}


def test_ray_executor_on_server(tiny_config: dict[str, Any], mlflow_server: str):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = load_config(None, {**tiny_config, "tracking_uri": mlflow_server,
                                 "executor": "ray"})
        outcome = run_benchmark(cfg, progress=False)
        assert ray.is_initialized()  # a Ray the caller started is left running
    finally:
        ray.shutdown()
    assert [r.status for r in outcome.results] == ["FINISHED"] * 4
    assert_grid_landed(mlflow_server, "test", outcome.parent_run_id, GRID)


def test_local_executor_two_workers_through_its_own_server(tiny_config: dict[str, Any],
                                                           tmp_path: Path):
    """executor=local, 2 workers, a sqlite URI: the driver starts a real `mlflow server` on
    127.0.0.1 in front of the DB, workers log over HTTP, every cell lands once in the DB."""
    cfg = load_config(None, {**tiny_config, "executor": "local", "workers": 2})
    outcome = run_benchmark(cfg, progress=False)
    assert [r.status for r in outcome.results] == ["FINISHED"] * 4
    assert [(r.cell.strategy, r.cell.seed) for r in outcome.results] == [
        ("full", 0), ("full", 1), ("last_k", 0), ("last_k", 1)]  # cell order kept
    assert (tmp_path / "mlflow-server.log").is_file()  # the server ran (and has been stopped)
    with pytest.raises(TrackingServerError):
        check_reachable(_server_uri_from_log(tmp_path / "mlflow-server.log"), timeout_s=1)
    # read the SQLite file directly: what the server wrote is there
    assert_grid_landed(tiny_config["tracking_uri"], "test", outcome.parent_run_id, GRID,
                       check_artifacts=False)


def _server_uri_from_log(log: Path) -> str:
    import re

    match = re.search(r"http://127\.0\.0\.1:\d+", log.read_text())
    assert match, log.read_text()[-2000:]
    return match.group(0)


def test_unreachable_server_is_a_clear_error():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingServerError, match="cannot reach the MLflow tracking server"):
        check_reachable(uri, timeout_s=1)


def test_executor_config_validation(tiny_config: dict[str, Any]):
    with pytest.raises(ConfigError, match="executor"):
        load_config(None, {**tiny_config, "executor": "dask"})
    with pytest.raises(ConfigError, match="gpus_per_run"):
        load_config(None, {**tiny_config, "gpus_per_run": 1.5})
    cfg = load_config(None, {**tiny_config, "executor": "ray", "gpus_per_run": 0.25,
                             "ray_address": "auto"})
    assert cfg.gpus_per_run == 0.25


def test_cli_flags_reach_the_config():
    from metalr_bench.benchmark.cli import _run_parser, resolve_config

    args = _run_parser().parse_args(["--executor", "local", "--workers", "3",
                                     "--gpus-per-run", "0.5", "--ray-address", "auto"])
    cfg = resolve_config(args)
    assert (cfg.executor, cfg.workers, cfg.gpus_per_run, cfg.ray_address) == (
        "local", 3, 0.5, "auto")


# -- parallel Optuna workers ---------------------------------------------------------------------
def quadratic(trial) -> float:
    """Cheap picklable objective (imported by path in the workers)."""
    x = trial.suggest_float("x", -3.0, 3.0)
    trial.set_user_attr("pid", os.getpid())
    return -(x - 1.0) ** 2


def test_two_optuna_workers_share_a_journal_exactly(tmp_path: Path):
    from metalr_bench.benchmark.parallel_tuning import TuningJob, run_parallel_tuning
    from optuna.trial import TrialState

    storage = str(tmp_path / "optuna.journal")
    # one objective passed as a picklable callable, one as an import path resolved in the worker
    objectives = [quadratic, f"{quadratic.__module__}:quadratic"]
    jobs = [TuningJob(study_name=f"study-{i}", storage=storage, objective=objectives[i],
                      n_trials=3, sampler_seed=i) for i in range(2)]
    studies = run_parallel_tuning(jobs, n_workers=2, executor="local", progress=False)
    assert set(studies) == {"study-0", "study-1"}
    for study in studies.values():
        trials = study.get_trials(deepcopy=False)
        assert len(trials) == 3, [t.state for t in trials]
        assert all(t.state == TrialState.COMPLETE for t in trials)
        assert sorted(t.number for t in trials) == [0, 1, 2]
        # trials ran in worker processes sharing the journal, not in the test process
        assert os.getpid() not in {t.user_attrs["pid"] for t in trials}
