"""Issue 37: like for like. The tuned control runs at MetaLR's tuned parameters, BitFit trains
the biases it names, WiSE-FT is tuned on the model it reports, untested is not tied, one-off
costs count, and the answer says how many seeds would separate a tie."""

from __future__ import annotations

from typing import Any

import optuna
from metalr_bench.benchmark.config import validate_config
from metalr_bench.benchmark.planning.plan import plan_rows
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.benchmark.tuning import studies as tuning
from mlflow import MlflowClient


def _cells(uri: str, experiment: str) -> list[Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("kind", "cell") == "cell" and "strategy" in r.data.tags]


def test_tuned_control_runs_at_metalrs_tuned_parameters(tiny_config: dict[str, Any]) -> None:
    cfg = validate_config({**tiny_config, "epochs": 1, "seeds": [0],
                           "strategies": ["metalr", "discriminative"],
                           "tune": {"enabled": True, "n_trials": 2, "pruner": "none"}})
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed, [r.error for r in outcome.results]
    # one study only: metalr's; discriminative has none of its own
    studies = optuna.get_all_study_summaries(tuning.storage_url(cfg))
    assert [s.study_name.split("-")[-2] for s in studies] == ["metalr"]
    best = studies[0].best_trial.params
    runs = {r.data.tags["strategy"]: r for r in _cells(tiny_config["tracking_uri"], "test")}
    metalr, control = runs["metalr"], runs["discriminative"]
    assert float(control.data.params["lr"]) == float(metalr.data.params["lr"]) == best["lr"]
    assert control.data.params["tuned_from"] == "metalr"
    assert control.data.tags["tuned_from"] == "metalr"
    assert control.data.tags["optuna.study_name"] == metalr.data.tags["optuna.study_name"]
    for k in ("strategy.backbone_lr_scale", "strategy.head_pin_fraction", "strategy.optimizer",
              "optimizer", "weight_decay", "batch_size", "epochs"):
        assert control.data.params[k] == metalr.data.params[k], k
    assert "tuned_from" not in metalr.data.params


def test_alone_the_control_keeps_its_own_study_and_plan_prices_no_control_study(
        tiny_config: dict[str, Any]) -> None:
    both = validate_config({**tiny_config, "strategies": ["metalr", "discriminative"],
                            "tune": {"enabled": True, "n_trials": 2}})
    rows = plan_rows(both)
    assert [r.strategy for r in rows if r.phase == "tuning"] == ["metalr"]
    assert sorted(r.strategy for r in rows if r.phase == "final") == ["discriminative", "metalr"]
    alone = validate_config({**tiny_config, "strategies": ["discriminative"],
                             "tune": {"enabled": True, "n_trials": 2}})
    assert [r.strategy for r in plan_rows(alone) if r.phase == "tuning"] == ["discriminative"]
