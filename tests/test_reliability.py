"""Issue 26: quiet when asked, observable in MLflow, nothing lost mid-cell.

Each test drives real components: a real ``run-benchmark`` process, real SQLite MLflow stores,
real worker processes, a real ``mlflow server`` on 127.0.0.1. Configs are the tiniest that still
exercise the path (smallcnn, synthetic data, 1-3 epochs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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


PROGRESS_MARKS = ("epoch 1/2", "pretrain smallcnn", "it/s", "run/s", "%|", "\r")


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
