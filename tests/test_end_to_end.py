"""Two strategies x two seeds through the real runner into a real SQLite MLflow store."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlflow
import pytest
from metalr_bench.benchmark.cli import main
from metalr_bench.benchmark.config import validate_config
from metalr_bench.benchmark.running.runner import leaderboard, run_benchmark


def test_grid_lands_child_runs_with_tags(tiny_config) -> None:
    cfg = validate_config(tiny_config)
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name("test")
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'"
    )
    seen = sorted((r.data.tags["strategy"], r.data.tags["seed"]) for r in children)
    assert seen == [("full", "0"), ("full", "1"), ("last_k", "0"), ("last_k", "1")]
    hashes = {r.data.tags["config_hash"] for r in children}
    assert len(hashes) == 4
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.tags["dataset"] == "synthetic"
        assert {"test_auc", "test_acc", "test_balanced_acc", "test_f1", "best_val_auc",
                "peak_memory_mb", "mean_epoch_time_s"} <= set(r.data.metrics)
        assert r.data.params["epochs"] == "2"
        history = client.get_metric_history(r.info.run_id, "val_auc")
        assert [m.step for m in history] == [0, 1]
        assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 2
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "config.json" in artifacts
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "benchmark"
    board = leaderboard(outcome.results)
    assert board["n_seeds"].tolist() == [2, 2]
    by_run = {(r.data.tags["strategy"], r.data.tags["seed"]): r.data.metrics["test_auc"]
              for r in children}
    full_mean = (by_run[("full", "0")] + by_run[("full", "1")]) / 2
    assert board.loc[("synthetic@16", "full"), "test_auc_mean"] == pytest.approx(full_mean)


def test_last_k_run_keeps_frozen_drift_at_zero(tiny_config) -> None:
    tiny_config |= {"strategies": [{"name": "last_k", "params": {"k": 1}}], "seeds": [0]}
    cfg = validate_config(tiny_config)
    outcome = run_benchmark(cfg, progress=False)
    run = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri).get_run(outcome.results[0].run_id)
    assert run.data.metrics["drift/stem"] == 0.0
    assert run.data.metrics["drift/head"] > 0.0


def test_cli_prints_leaderboard(tiny_config, tmp_path, capsys) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["--config", str(path), "--seeds", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Leaderboard" in out and "synthetic@16" in out and "last_k" in out
    assert "mlflow ui --backend-store-uri" in out
    assert re.search(r"then open http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?workflowType="
                     r"machine_learning", out)


def test_pretrain_stage_is_cached_and_logged(tiny_config) -> None:
    tiny_config |= {"strategies": ["full"], "seeds": [0, 1],
                    "model": {"arch": "smallcnn", "weights": "pretrain",
                              "pretrain": {"epochs": 1, "options": {"n_images": 64}}}}
    cfg = validate_config(tiny_config)
    run_benchmark(cfg, progress=False)
    run_benchmark(cfg, progress=False)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name("test")
    pre = client.search_runs([exp.experiment_id], "tags.kind = 'pretrain'")
    assert len(pre) == 1  # trained once, reused by both seeds and by the second call
    assert pre[0].data.metrics["best_val_acc"] >= 0


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch) -> None:
    from metalr_bench.benchmark.tracking.client import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def _readme_filters() -> list[str]:
    """The search-box examples of docs/mlflow.md, "Comparing the same runs in the MLflow UI",
    step 4."""
    readme = (Path(__file__).parents[1] / "docs" / "mlflow.md").read_text()
    section = readme.split("## Comparing the same runs in the MLflow UI", 1)[1].split("\n## ", 1)[0]
    step = section.split("4. Filter", 1)[1].split("\n5. ", 1)[0]
    found = re.findall(r"``(.+?)``|`([^`]+)`", step)
    texts = [a or b for a, b in found if "#/" not in (a or b)]  # not the link example
    return [t for t in texts if t.startswith(("tags.", "params.", "metrics.", "attributes."))]


def test_readme_mlflow_filters_select_what_they_say(tiny_config) -> None:
    """Every filter the docs tell users to type into the MLflow UI parses and selects the runs
    it describes, in a real store written by the runner."""
    tiny_config |= {"datasets": [{"adapter": "synthetic", "size": 28, "options": {"n_patients": 48}}],
                    "strategies": ["metalr", {"name": "last_k", "params": {"k": 2}}],
                    "seeds": [0], "epochs": 1}
    cfg = validate_config(tiny_config)
    outcome = run_benchmark(cfg, progress=False)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name("test").experiment_id
    runs = client.search_runs([exp])
    parent = outcome.parent_run_id
    expected: dict[str, Any] = {
        "tags.strategy = 'metalr' AND tags.dataset = 'synthetic'":
            lambda r: r.data.tags.get("strategy") == "metalr",
        "tags.image_size = '28' AND metrics.test_auc > 0.8":
            lambda r: r.data.tags.get("image_size") == "28"
            and r.data.metrics.get("test_auc", 0) > 0.8,
        "tags.mlflow.parentRunId = '<parent run id>'":
            lambda r: r.data.tags.get("mlflow.parentRunId") == parent,
        "attributes.run_name LIKE 'synthetic@28/%'":
            lambda r: r.info.run_name.startswith("synthetic@28/"),
        "attributes.status = 'FAILED'": lambda r: r.info.status == "FAILED",
        "params.`strategy.k` = '2'": lambda r: r.data.params.get("strategy.k") == "2",
        "tags.kind = 'benchmark'": lambda r: r.info.run_id == parent,
    }
    filters = _readme_filters()
    assert sorted(filters) == sorted(expected), "docs/mlflow.md's filter examples changed: update the test"
    by_id = {r.info.run_id: r for r in runs}
    for text in filters:
        got = {r.info.run_id for r in
               client.search_runs([exp], text.replace("<parent run id>", parent))}
        want = {i for i, r in by_id.items() if expected[text](r)}
        assert got == want, text
        if text in ("tags.strategy = 'metalr' AND tags.dataset = 'synthetic'",
                    "tags.kind = 'benchmark'"):
            assert len(got) == 1, text  # not vacuous: each selects exactly one run here
    # the names step 3 describes: `<name>-benchmark` and `<dataset>@<size>/<label>/seed<N>`
    assert by_id[parent].info.run_name == "test-benchmark"
    names = sorted(by_id[i].info.run_name for i in by_id if i != parent)
    assert names == ["synthetic@28/last_k(k=2)/seed0", "synthetic@28/metalr/seed0"]


def test_mlflow_ui_hint_links_the_runs_page() -> None:
    from metalr_bench.benchmark.cli import mlflow_ui_hint

    assert mlflow_ui_hint("http://10.0.0.5:5000/", "7") == \
        "Browse: http://10.0.0.5:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert mlflow_ui_hint("sqlite:////x/mlflow.db", "1").endswith(
        "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning")
