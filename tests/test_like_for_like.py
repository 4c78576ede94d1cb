"""Issue 37: like for like. The tuned control runs at MetaLR's tuned parameters, BitFit trains
the biases it names, WiSE-FT is tuned on the model it reports, untested is not tied, one-off
costs count, and the answer says how many seeds would separate a tie."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
import pytest
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


# -- untested is not tied; a constant difference has no p -----------------------------------------
def _frame(values: dict[str, list[float]], **cols: Any) -> Any:
    import pandas as pd

    rows = [{"run_id": f"{s}-{i}", "status": "FINISHED", "dataset_key": "d@28", "cv_key": None,
             "fold": None, "strategy": s, "strategy_label": s, "seed": i, "test_auc": v,
             "mean_epoch_time_s": 1.0, **{k: c.get(s) for k, c in cols.items()}}
            for s, vs in values.items() for i, v in enumerate(vs)]
    return pd.DataFrame(rows)


def test_a_strategy_with_one_run_is_not_tested_and_never_tied() -> None:
    from metalr_bench.reports import answer as A

    res = _frame({"best": [0.91, 0.90, 0.92], "other": [0.905, 0.91, 0.90], "lone": [0.20]})
    a = A.the_answer(res, "test_auc").per_dataset["d@28"]
    assert a.best == "best"
    assert "lone" not in a.tied and a.untested == {"lone": 1}
    assert a.tied == ["other"]
    text = " ".join(a.sentences)
    assert "`lone`: not tested (1 paired run)" in text
    assert "No other tested strategy can be told apart" in text


def test_a_constant_difference_is_reported_with_its_size_not_p_zero() -> None:
    import warnings

    import pandas as pd
    from metalr_bench.reports import answer as A
    from metalr_bench.reports import stats

    a, b = pd.Series([0.90, 0.91, 0.92]), pd.Series([0.88, 0.89, 0.90])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's RuntimeWarning on the old code fails here
        t = stats.paired_test(b, a)
    assert t.test == stats.CONSTANT_DIFFERENCE
    assert t.mean_diff == pytest.approx(-0.02) and math.isnan(t.p_value)
    res = _frame({"best": [0.90, 0.91, 0.92], "flat": [0.88, 0.89, 0.90]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ans = A.the_answer(res, "test_auc").per_dataset["d@28"]
    assert ans.tied == [] and ans.constant == {"flat": pytest.approx(-0.02)}
    assert "`flat` -0.020" in " ".join(ans.sentences)


# -- how many more seeds --------------------------------------------------------------------------
def _power_by_hand(d: float, n: int, alpha: float = 0.05) -> float:
    from scipy import stats as sps

    crit = sps.t.ppf(1 - alpha / 2, n - 1)
    nc = d * math.sqrt(n)
    return sps.nct.sf(crit, n - 1, nc) + sps.nct.cdf(-crit, n - 1, nc)


def test_seeds_needed_against_a_hand_computation() -> None:
    from metalr_bench.reports import stats

    # known values of the two-sided one-sample/paired t-test at 80 % power (G*Power): d = 1
    # needs 10 pairs, d = 0.5 needs 34
    assert stats.seeds_needed(0.01, 0.01) == 10
    assert stats.seeds_needed(-0.005, 0.01) == 34
    for mean, sd in ((0.004, 0.006), (0.02, 0.005), (0.001, 0.01)):
        n = stats.seeds_needed(mean, sd)
        d = abs(mean) / sd
        assert _power_by_hand(d, n) >= 0.8 > _power_by_hand(d, n - 1) if n > 2 else True
    assert stats.seeds_needed(0.01, 0.0) is None


def test_the_answer_says_how_many_seeds_would_separate_a_tie() -> None:
    from metalr_bench.reports import answer as A

    best = [0.900, 0.910, 0.905]
    tie = [0.898, 0.915, 0.893]  # diffs -0.002, +0.005, -0.012
    tiny = [0.899, 0.912, 0.903]  # diffs -0.001, +0.002, -0.002: below min_effect
    res = _frame({"best": best, "tie": tie, "tiny": tiny})
    a = A.the_answer(res, "test_auc", min_effect=0.002).per_dataset["d@28"]
    assert sorted(a.tied) == ["tie", "tiny"]
    d = np.array(tie) - np.array(best)
    row = a.seeds.set_index("strategy").loc["tie"]
    assert row["mean_diff"] == pytest.approx(d.mean()) and row["sd"] == pytest.approx(d.std(ddof=1))
    n = 2
    while _power_by_hand(abs(d.mean()) / d.std(ddof=1), n) < 0.8:
        n += 1
    assert row["pairs_needed"] == n
    assert bool(a.seeds.set_index("strategy").loc["tiny", "too_small"])
    text = " ".join(a.sentences)
    assert f"`tie` {d.mean():+.3f} ± {d.std(ddof=1):.3f} (sd of 3 pairs): {n} seeds" in text
    assert "`tiny`" in text and "too small to matter" in text
    assert f"run-benchmark plan --config <your config> --seeds 0 1 … {n - 1}" in text


# -- the answer says which control it compared ----------------------------------------------------
def test_the_control_line_says_whose_parameters_the_control_ran_at() -> None:
    import pandas as pd
    from metalr_bench.reports import answer as A

    def grid(ds: str, tuned_from: str | None, gain: float) -> pd.DataFrame:
        f = _frame({"metalr": [0.90 + gain, 0.91 + gain + 0.001, 0.92 + gain],
                    "discriminative": [0.90, 0.91, 0.92]},
                   tuned={"metalr": "true", "discriminative": "true"},
                   tuned_from={"discriminative": tuned_from})
        f["dataset_key"] = ds
        return f

    res = pd.concat([grid("a@28", "metalr", 0.01), grid("b@28", "metalr", 0.02),
                     grid("c@28", None, -0.05)], ignore_index=True)
    ans = A.the_answer(res, "test_auc")
    a, c = " ".join(ans.per_dataset["a@28"].sentences), " ".join(ans.per_dataset["c@28"].sentences)
    assert "`discriminative` at MetaLR's tuned parameters" in a
    assert "tuned in its own study" in c and "not like for like" in c
    # across datasets: only a and b (like for like); their mean difference, c named as left out
    assert ans.control is not None
    assert f"mean paired difference {np.mean([0.01 + 0.001 / 3, 0.02 + 0.001 / 3]):+.3f}" in \
        ans.control
    assert "over 2 datasets" in ans.control and "left out" in ans.control and "c@28" in ans.control


# -- BitFit as its paper runs it ------------------------------------------------------------------
def test_bitfit_trains_biases_and_head_on_resnet18_and_gamma_only_when_asked() -> None:
    from metalr_bench.benchmark.config import Cell
    from metalr_bench.benchmark.models.zoo import build_model
    from metalr_bench.strategies import get_strategy
    from metalr_bench.strategies.core.base import TrainSettings
    from metalr_bench.strategies.core.layers import layer_groups

    def trainable(params: dict[str, Any]) -> int:
        model = build_model("resnet18", 3, 2)
        get_strategy("bitfit")(params, model, layer_groups(model), TrainSettings(lr=0.1))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    # BN β: 4,800 (stem 64, layer1 4·64, layer2 5·128, layer3 5·256, layer4 5·512 channels with
    # the downsample BNs); the head 512·2 + 2 = 1,026; γ another 4,800
    assert trainable({}) == 4_800 + 1_026 == 5_826
    assert trainable({"train_norm_scale": True}) == 10_626
    d = validate_config({"datasets": ["synthetic"]}).dataset_specs()[0]
    plain = Cell(dataset=d, strategy="bitfit", params={}, seed=0)
    gamma = Cell(dataset=d, strategy="bitfit", params={"train_norm_scale": True}, seed=0)
    assert plain.strategy_label == "bitfit"
    assert gamma.strategy_label == "bitfit(train_norm_scale=True)"
    tuned = Cell(dataset=d, strategy="bitfit", params={"train_norm_scale": True}, seed=0,
                 study="s")
    assert tuned.strategy_label == "bitfit(train_norm_scale=True,tuned)"
    assert Cell(dataset=d, strategy="bitfit", params={}, seed=0, study="s").strategy_label == \
        "bitfit(tuned)"


# -- WiSE-FT tuned on the model it reports; α = 0 is the starting model ---------------------------
def test_wise_ft_alpha_zero_is_the_starting_model_exactly(tiny_config: dict[str, Any]) -> None:
    import torch
    from metalr_bench.benchmark.config import Cell
    from metalr_bench.benchmark.training import cell as cell_mod

    cfg = validate_config({**tiny_config, "epochs": 1})
    # a fixed probe λ: one probe fit, not the λ sweep (seconds on a busy CPU)
    cell = Cell(dataset=cfg.dataset_specs()[0], strategy="wise_ft",
                params={"alpha": 0.0, "probe_l2": 1e-3}, seed=0)
    result = cell_mod.train_cell(cfg, cell, cell_mod.DataCache().get(cell), None, artifacts=False)
    start, final = result.start_state, result.final_state
    head = [k for k in final if k.startswith(("head.", "fc.", "classifier."))]
    assert head  # the probe's head: θ₀'s, not the start's random one
    for k in [k for k in final if k.endswith(("running_mean", "running_var"))]:
        assert torch.equal(final[k].cpu(), start[k].cpu()), f"{k} re-estimated at α = 0"
    for k, v in final.items():
        if k in start and k not in head:  # BN statistics included: not re-estimated
            assert torch.equal(v.cpu(), start[k].cpu()), k
    bn = [k for k in final if k.endswith("running_mean")]
    assert bn and result.end_val is not None
    assert result.final_values["wise_ft/alpha"] == 0.0


def test_wise_ft_is_tuned_on_the_interpolated_models_validation_score(
        tiny_config: dict[str, Any]) -> None:
    cfg = validate_config({**tiny_config, "epochs": 2, "seeds": [0],
                           "strategies": [{"name": "wise_ft",
                                           "params": {"alpha": 0.0, "probe_l2": 1e-3}}],
                           "tune": {"enabled": True, "n_trials": 1, "pruner": "none",
                                    "metric": "val_loss"}})
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed, [r.error for r in outcome.results]
    study = optuna.get_all_study_summaries(tuning.storage_url(cfg))[0]
    client = MlflowClient(tiny_config["tracking_uri"])
    exp = client.get_experiment_by_name("test")
    trial = client.search_runs([exp.experiment_id], "tags.kind = 'trial'")[0]
    epochs = [m.value for m in client.get_metric_history(trial.info.run_id, "val_loss")]
    # θ(α* = 0)'s validation loss, the model the row reports; not the endpoint's best epoch
    assert study.best_trial.value == pytest.approx(trial.data.metrics["best_val_loss"])
    assert study.best_trial.value != pytest.approx(min(epochs))


# -- one-off costs --------------------------------------------------------------------------------
def test_one_off_seconds_are_logged_shown_and_counted_in_the_cost_ratio(
        tiny_config: dict[str, Any]) -> None:
    from metalr_bench.reports import answer as A
    from metalr_bench.reports.cost import cost_table
    from metalr_bench.reports.results import load_runs, results_table

    cfg = validate_config({**tiny_config, "epochs": 1, "seeds": [0],
                           "strategies": ["full", {"name": "lp_ft",
                                                   "params": {"probe_l2": 1e-3}}]})
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed, [r.error for r in outcome.results]
    res = results_table(load_runs(tiny_config["tracking_uri"], "test"))
    by = res.set_index("strategy")
    assert by.loc["full", "oneoff_time_s"] == 0.0
    probe = by.loc["lp_ft", "oneoff_time_s/probe_fit"]
    assert probe > 0 and by.loc["lp_ft", "oneoff_time_s"] == pytest.approx(probe)
    table = cost_table(res).set_index("strategy")
    assert "one-off time per run (s)" in table.columns
    assert table.loc["lp_ft(probe_l2=0.001)", "one-off time per run (s)"] == round(probe, 2)
    # the answer's ratio: epochs × time per epoch + one-off, over full's
    run = {s: by.loc[s, "mean_epoch_time_s"] * 1 + by.loc[s, "oneoff_time_s"]
           for s in ("full", "lp_ft")}
    assert A.run_seconds(res)["lp_ft(probe_l2=0.001)"] == pytest.approx(run["lp_ft"])
    text = " ".join(A.the_answer(res, "test_auc").per_dataset[res["dataset_key"][0]].sentences)
    assert f"Time per run (epochs × time per epoch + one-off seconds) relative to `full` " \
           f"({run['full']:.2f} s)" in text


def test_deltas_attention_pass_is_a_one_off_kept_out_of_the_epoch_time(
        tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from metalr_bench.benchmark.config import Cell
    from metalr_bench.benchmark.training import cell as cell_mod
    from metalr_bench.strategies import get_strategy

    delta = get_strategy("delta")
    compute = delta.compute_attention

    def slow(self: Any, *a: Any, **k: Any) -> Any:
        time.sleep(1.0)
        return compute(self, *a, **k)

    monkeypatch.setattr(delta, "compute_attention", slow)
    cfg = validate_config({**tiny_config, "epochs": 1})
    cell = Cell(dataset=cfg.dataset_specs()[0], strategy="delta",
                params={"attention_batches": 1}, seed=0)
    result = cell_mod.train_cell(cfg, cell, cell_mod.DataCache().get(cell), None, artifacts=False)
    assert result.oneoff_times["attention"] >= 1.0
    epoch = result.history[0]["epoch_time_s"]
    assert epoch < result.total_time_s - 1.0  # the second of attention is not in the epoch
    assert result.summary()["oneoff_time_s"] == pytest.approx(result.oneoff_times["attention"])


def test_across_datasets_an_untested_top_is_named_untested_not_tied() -> None:
    import pandas as pd
    from metalr_bench.reports import answer as A

    def ds(key: str, values: dict[str, list[float]]) -> pd.DataFrame:
        f = _frame(values)
        f["dataset_key"] = key
        return f

    res = pd.concat([
        ds("d@28", {"x": [0.99, 0.98, 0.97], "z": [0.90, 0.91, 0.93], "y": [0.80, 0.82, 0.81]}),
        ds("f@28", {"x": [0.99, 0.98, 0.97], "z": [0.90, 0.91, 0.93], "y": [0.80, 0.82, 0.81]}),
        ds("e@28", {"y": [0.95, 0.96, 0.97], "z": [0.90, 0.905, 0.93], "x": [0.70]}),
    ], ignore_index=True)
    ans = A.the_answer(res, "test_auc")
    assert ans.across.avg_ranks.index[0] == "x"
    assert "x" not in ans.per_dataset["e@28"].tied
    text = " ".join(ans.across.sentences)
    assert "on e@28 `y` is best and `x` is not tested (1 paired run)" in text
