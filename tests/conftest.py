"""Shared fixtures: a pre-migrated SQLite MLflow store per test, tiny configs, fast torch.

Migrating a fresh MLflow SQLite DB takes seconds; we migrate one template per session and copy
it for every test that needs a store (milliseconds).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# torchvision through the project's shim (benchmark/models/tv_compat.py) before any test imports
# it another way: peft (the `lora` strategy) imports transformers, which imports torchvision
from metalr_bench.benchmark.models.tv_compat import import_torchvision  # noqa: E402

import_torchvision()

SHARED_DATA_CANDIDATES = (
    os.environ.get("METALR_BENCH_DATA", ""),
    str(Path(__file__).resolve().parents[1].parent / "shared" / "data"),
)


def shared_data_dir() -> Path | None:
    """The folder holding the real pneumoniamnist.npz, or None (opt-in real-data tests)."""
    for cand in SHARED_DATA_CANDIDATES:
        if cand and (Path(cand) / "pneumoniamnist.npz").is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlflow

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # migrates
    return db


@pytest.fixture
def mlflow_uri(tmp_path: Path, _mlflow_template: Path) -> str:
    """A fresh, already migrated SQLite tracking URI inside ``tmp_path``."""
    db = tmp_path / "mlflow.db"
    shutil.copy(_mlflow_template, db)
    return f"sqlite:///{db}"


@pytest.fixture
def tiny_config(tmp_path: Path, mlflow_uri: str) -> dict[str, Any]:
    """A config dict that trains in about a second per cell on CPU."""
    return {
        "name": "test",
        "datasets": [{"adapter": "synthetic", "size": 16, "options": {"n_patients": 48}}],
        "strategies": ["full", "last_k"],
        "seeds": [0, 1],
        "model": {"arch": "smallcnn", "weights": "none"},
        "epochs": 2,
        "batch_size": 16,
        "device": "cpu",
        "tracking_uri": mlflow_uri,
        "output_dir": str(tmp_path / "out"),
        "report": False,  # the report has its own tests (tests/test_reports.py)
    }


@pytest.fixture(scope="session")
def postgres_server() -> Any:
    """A real PostgreSQL server on 127.0.0.1 for this session (Debian's binaries), or a skip.

    Started once (initdb + start take seconds); each test gets its own database from
    ``postgres_url`` so studies of one test never show up in another.
    """
    import pwd
    import socket
    import subprocess
    import tempfile

    bins = os.pathsep.join([os.environ.get("PATH", ""),
                            *map(str, sorted(Path("/usr/lib/postgresql").glob("*/bin")))])
    initdb, pg_ctl = shutil.which("initdb", path=bins), shutil.which("pg_ctl", path=bins)
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed")
    pytest.importorskip("psycopg2")
    root = Path(tempfile.mkdtemp(prefix="metalr-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w",
                    "-o", f"-p {port} -h 127.0.0.1 -k {root}", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server: the database-server path of
    Optuna storages (workers on several hosts) is tested against it."""
    import uuid

    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return f"{postgres_server}/{name}"


# -- the quick lane: `python -m pytest -m "not slow"` ------------------------------------------------
# Besides the tests marked `@pytest.mark.slow` where they are defined, a test is slow when it
# starts a server (an `mlflow server`, PostgreSQL) or Ray: tens of seconds to minutes each.
# Also slow: the tests below, which start worker processes or kill one (found by timing the lane
# on the 2-core development host, 2026-12-07: each took 30 s to 2 min there under load).
SLOW_FIXTURES = {"mlflow_server", "postgres_server", "postgres_url"}
SLOW_TESTS = {
    "test_local_executor_two_workers_through_its_own_server",
    "test_fill_study_two_processes_exact",
    "test_local_executor_runs_tuning_workers",
    "test_race_picks_the_clearly_best_strategy_registers_it_and_the_model_reproduces_its_test_metric",
    "test_a_killed_race_rerun_continues_the_same_study_no_trial_lost_or_repeated",
    "test_a_race_on_the_local_executor_shares_its_study_between_the_workers",
    "test_warnings_in_local_workers_are_one_line",
    "test_kill_9_mid_epoch_resumes_the_cell_to_the_uninterrupted_result",
    "test_n_folds_runs_every_fold_under_its_own_name",
    # end-to-end runs through the runner, a report's kernel, a study or a subprocess, each 3-40 s
    # (the lane timed with --durations=0 on 2026-12-07, fifth session): CI runs them, the lane
    # keeps the math and the conformance suite
    "test_every_sampled_point_builds",
    "test_report_built_by_the_benchmark_holds_the_right_leaderboard",
    "test_no_progress_silences_pretraining_and_stdout_holds_only_results",
    "test_compile_runs_metalr_through_compiled_graphs",
    "test_a_dataset_pretrains_on_its_own_source",
    "test_report_builds_when_strategies_share_a_param_name_of_other_types",
    "test_kill_and_rerun_continues_the_same_study",
    "test_check_compares_the_plan_with_the_runs_in_mlflow",
    "test_every_named_strategy_is_raced_to_full_resource_and_listed",
    "test_delta_on_timm_backbones_uses_every_feature_map_of_the_model",
    "test_gpu_figures_runs_every_tool_and_writes_markdown",
    "test_adapter_bundle_trains_one_epoch",
    "test_new_strategies_run_through_the_runner",
    "test_ctrl_c_marks_killed_keeps_checkpoint_and_resumes_exactly",
    "test_every_training_run_logs_system_metrics_unless_turned_off",
    "test_journal_storage_and_study_name",
    "test_a_strategy_in_one_file_runs_everywhere",
    "test_runs_log_their_splits_as_mlflow_dataset_inputs",
    "test_grid_lands_child_runs_with_tags",
    "test_pretrain_stage_is_cached_and_logged",
    "test_new_strategy_trains_through_the_cell_builder",
    "test_two_strategies_three_trials_nested_runs_pruning_best_params_and_no_test_reads",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = getattr(item, "originalname", item.name)
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or name in SLOW_TESTS
                or "ray" in name.split("_")):
            item.add_marker(pytest.mark.slow)
