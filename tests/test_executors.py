"""Executors: local processes and Ray land every cell exactly once under one parent run in a
real ``mlflow server``; parallel Optuna workers fill studies exactly."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from metalr_bench.benchmark.config import ConfigError, load_config
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.benchmark.tracking.server import (
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
    x = trial.suggest_float("x", -3.0, 3.0)
    trial.set_user_attr("pid", os.getpid())
    return -(x - 1.0) ** 2


def _fill(storage: str, name: str, seed: int, sleep_s: float = 0.0) -> int:
    """A worker process: fill study ``name`` to 5 trials through the shared quota lock."""
    import optuna
    from metalr_bench.benchmark.tuning.storage import fill_study, open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(storage),
                              sampler=optuna.samplers.TPESampler(seed=seed))

    def objective(trial) -> float:
        time.sleep(sleep_s)  # a wider window for the workers to race in
        return quadratic(trial)

    return fill_study(study, objective, n_trials=5, url=storage)


def test_fill_study_two_processes_exact(tmp_path: Path):
    """Two processes racing on one journal-file study end with exactly n_trials, no gaps."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import optuna
    from metalr_bench.benchmark.tuning.storage import open_storage

    storage = str(tmp_path / "optuna-journal.log")
    optuna.create_study(study_name="s", storage=open_storage(storage), direction="maximize")
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        ran = list(pool.map(_fill, [storage] * 2, ["s"] * 2, [0, 1]))
    trials = optuna.load_study(study_name="s", storage=open_storage(storage)).get_trials()
    assert sum(ran) == 5
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4]
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert os.getpid() not in {t.user_attrs["pid"] for t in trials}


def test_fill_study_workers_on_a_postgresql_server_exact(postgres_url: str):
    """Four processes on two studies of a real PostgreSQL storage (the several-hosts setup): the
    row lock keeps every study at exactly n_trials, numbered without gaps or duplicates."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import optuna
    from metalr_bench.benchmark.tuning.storage import LOCK_TABLE, open_storage

    storage = open_storage(postgres_url)
    for name in ("pg-a", "pg-b"):
        optuna.create_study(study_name=name, storage=storage, direction="maximize")
    names = ["pg-a", "pg-b"] * 4  # 4 workers per study, 8 processes in all
    with ProcessPoolExecutor(4, mp_context=mp.get_context("spawn")) as pool:
        ran = list(pool.map(_fill, [postgres_url] * 8, names, range(8), [0.05] * 8))
    assert sum(ran) == 10
    for name in ("pg-a", "pg-b"):
        trials = optuna.load_study(study_name=name, storage=open_storage(postgres_url)).trials
        assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4], name
        assert {t.state.name for t in trials} == {"COMPLETE"}
    import sqlalchemy as sa

    with sa.create_engine(postgres_url).connect() as conn:  # one lock row per study
        rows = conn.execute(sa.text(f"SELECT name FROM {LOCK_TABLE} ORDER BY name")).all()
    assert [r[0] for r in rows] == ["pg-a", "pg-b"]


def _tuned_runs(uri: str, parent_id: str) -> tuple[list, dict[str, list], list]:
    """(study runs, trial runs per study run id, final cell runs) under one benchmark run."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    under = [r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_id]
    studies = [r for r in under if r.data.tags.get("kind") == "study"]
    finals = [r for r in under if r.data.tags.get("tuned") == "true"]
    trials = {s.info.run_id: [r for r in runs
                              if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == s.info.run_id]
              for s in studies}
    return studies, trials, finals


def assert_tuned(uri: str, outcome: Any, storage: str, n_trials: int) -> set[str]:
    """2 studies x ``n_trials`` finished trials in Optuna and MLflow, each once; the final
    2 x 2 grid once. Returns the workers (host:pid) that ran trials."""
    import optuna
    from metalr_bench.benchmark.tuning.studies import open_storage

    assert [r.status for r in outcome.results] == ["FINISHED"] * 4
    summaries = optuna.get_all_study_summaries(open_storage(storage))
    assert len(summaries) == 2
    workers: set[str] = set()
    for summary in summaries:
        trials = optuna.load_study(study_name=summary.study_name,
                                   storage=open_storage(storage)).get_trials()
        assert sorted(t.number for t in trials) == list(range(n_trials))  # no loss, no dupes
        assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
        workers |= {t.user_attrs["worker"] for t in trials}
    studies, trial_runs, finals = _tuned_runs(uri, outcome.parent_run_id)
    assert sorted(s.data.tags["strategy"] for s in studies) == ["full", "last_k"]
    for s in studies:
        numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in trial_runs[s.info.run_id])
        assert numbers == list(range(n_trials)), numbers
        assert s.info.status == "FINISHED" and "best_value" in s.data.metrics
    assert Counter((r.data.tags["strategy"], int(r.data.tags["seed"])) for r in finals) == \
        Counter(GRID)
    return workers


@pytest.mark.parametrize("where", ["journal", "postgresql"])
def test_local_executor_runs_tuning_workers(tiny_config: dict[str, Any], tmp_path: Path,
                                            where: str, request: pytest.FixtureRequest):
    """--tune with executor=local: 2 studies x 3 trials, two workers per study sharing the
    default JournalStorage file, or a PostgreSQL server (the several-hosts storage); every
    trial exactly once, run in worker processes."""
    tune = {"enabled": True, "n_trials": 3, "workers_per_study": 2, "pruner": "none"}
    storage = str(tmp_path / "optuna-journal.log")  # the default: next to mlflow.db
    if where == "postgresql":
        storage = tune["storage"] = request.getfixturevalue("postgres_url")
    cfg = load_config(None, {**tiny_config, "executor": "local", "workers": 2, "epochs": 1,
                             "tune": tune})
    outcome = run_benchmark(cfg, progress=False)
    workers = assert_tuned(tiny_config["tracking_uri"], outcome, storage, 3)
    pids = {w.rsplit(":", 1)[1] for w in workers}
    assert str(os.getpid()) not in pids and len(pids) == 2, workers


def test_ray_executor_runs_tuning_workers(tiny_config: dict[str, Any], mlflow_server: str,
                                          tmp_path: Path):
    """--tune with executor=ray: each study worker is a Ray task; trials land once."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = load_config(None, {**tiny_config, "tracking_uri": mlflow_server, "executor": "ray",
                                 "epochs": 1, "tune": {"enabled": True, "n_trials": 2}})
        outcome = run_benchmark(cfg, progress=False)
    finally:
        ray.shutdown()
    workers = assert_tuned(mlflow_server, outcome, str(tmp_path / "out" / "optuna-journal.log"),
                           2)
    assert str(os.getpid()) not in {w.rsplit(":", 1)[1] for w in workers}


def test_the_local_server_starts_no_job_runners(mlflow_server: str) -> None:
    """MLflow 3's `mlflow server` also starts its job runner and seven huey consumers (about
    240 MB and a second or more of CPU each at start), for features the suite never uses; on 2
    cores they compete with the workers (issue 38's 2-worker profile). The suite's own server
    starts without them (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false)."""
    import psutil

    check_reachable(mlflow_server)
    children = psutil.Process(os.getpid()).children(recursive=True)
    lines = [" ".join(c.cmdline()) for c in children if c.is_running()]
    assert any("uvicorn" in line or "mlflow" in line for line in lines), lines  # the server
    assert not [line for line in lines if "huey" in line or "_job_runner" in line]
