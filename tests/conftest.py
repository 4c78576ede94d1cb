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
        "datasets": [{"name": "synthetic", "size": 16, "options": {"n_patients": 48}}],
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
