"""Per-layer transferability (Chen et al. 2022) and the report's LR-against-T comparison.

T is checked against a hand computation on three state dicts written here; the runner is
checked to log it for pre-trained runs only; the report's sentence is recomputed from MLflow
with an independent exact Spearman test (all pairings enumerated with itertools).
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from bs4 import BeautifulSoup
from metalr_bench.benchmark.config import Cell, validate_config
from metalr_bench.benchmark.models.zoo import build_model
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.benchmark.training import transferability as tr
from metalr_bench.benchmark.training.cell import DataCache, build_cell
from metalr_bench.benchmark.training.pretrain import starting_weights
from metalr_bench.reports import transferability as rt
from metalr_bench.reports.build import build_report
from metalr_bench.strategies.core.layers import layer_groups
from mlflow import MlflowClient
from scipy import stats as sps
from torch import nn


class Tiny(nn.Module):
    """stem: one conv (+ BN); body: two convs (+ biases, BN) in one group; head: linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1))
        self.body = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.Conv2d(1, 4, 1))
        self.head = nn.Linear(4, 2)


def _states(body_moves: bool = True) -> tuple[dict[str, torch.Tensor], ...]:
    """θ_r, θ_A, θ_B as plain tensors. θ_B: stem conv 0.25, every other tensor 0.
    Weight layers: stem.0 (1 element), body.0 (1 element), body.2 (4 elements)."""
    model = Tiny()
    zeros = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    r, a, b = dict(zeros), dict(zeros), dict(zeros)
    b["stem.0.weight"] = torch.full((1, 1, 1, 1), 0.25)
    r["stem.0.weight"] = torch.full((1, 1, 1, 1), -1.0)  # |−1 − 0.25| = 1.25
    a["stem.0.weight"] = torch.full((1, 1, 1, 1), 0.5)  # |0.5 − 0.25| = 0.25 -> T = 5
    r["body.0.weight"], a["body.0.weight"] = torch.full((1, 1, 1, 1), 0.9), torch.full(
        (1, 1, 1, 1), 0.1)
    r["body.2.weight"], a["body.2.weight"] = torch.full((4, 1, 1, 1), -0.8), torch.full(
        (4, 1, 1, 1), 0.4)
    # biases, BatchNorm and the head differ wildly: they must not count
    for k in ("body.0.bias", "body.1.weight", "body.1.bias", "body.2.bias", "stem.1.weight",
              "head.weight", "head.bias"):
        r[k], a[k] = torch.full_like(zeros[k], 100.0), torch.full_like(zeros[k], 0.001)
    if not body_moves:
        for k in ("body.0.weight", "body.2.weight"):
            b[k] = a[k].clone()
    return r, a, b


def test_transferability_matches_a_hand_computation() -> None:
    model = Tiny()
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["stem", "body", "head"]
    assert tr.weight_layers(model, groups[1]) == ["body.0.weight", "body.2.weight"]
    r, a, b = _states()
    out = tr.transferability_metrics(model, groups, r, a, b)
    # stem: 1.25 / 0.25. body: per layer D then the mean over its two layers, then the ratio:
    # D(r,B) = (0.9 + 0.8) / 2, D(A,B) = (0.1 + 0.4) / 2 -> 3.4 (pooled over the 5 elements:
    # 0.82 / 0.34 = 2.41; mean of the layer ratios: (9 + 2) / 2 = 5.5)
    assert out == pytest.approx({"transferability/stem": 5.0, "transferability/body": 3.4,
                                 "transferability/mean_backbone": (5.0 + 3.4) / 2}, rel=1e-6)
    assert "transferability/head" not in out


def test_a_group_that_did_not_move_has_no_transferability() -> None:
    model = Tiny()
    r, a, b = _states(body_moves=False)
    out = tr.transferability_metrics(model, layer_groups(model), r, a, b)
    assert out == pytest.approx({"transferability/stem": 5.0})  # no body, so no mean either


def test_random_state_is_fixed_and_leaves_the_run_rng_alone() -> None:
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first = tr.random_state("smallcnn", 1, 2)
    assert torch.equal(torch.get_rng_state(), before)
    again = tr.random_state("smallcnn", 1, 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    torch.manual_seed(tr.TRANSFERABILITY_SEED)
    assert torch.equal(first["block2.0.weight"], build_model("smallcnn", 1, 2).state_dict()[
        "block2.0.weight"])


def test_start_state_is_the_trainers_start(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    """θ_A is what the trainer started from (stem adapted from an RGB checkpoint included),
    handed over by the run's result, not rebuilt: unchanged by training."""
    source = build_model("smallcnn", 3, 5)  # RGB, 5 classes: the stem is summed to grey
    path = tmp_path / "source.pt"
    torch.save(source.state_dict(), path)
    cfg = validate_config(tiny_config | {"model": {"arch": "smallcnn", "weights": str(path)}})
    cell = Cell(cfg.datasets[0], "full", {}, 0)
    bundle = DataCache().get(cell)
    weights, _ = starting_weights(cfg, bundle, None, None)
    trainer = build_cell(cfg, cell, bundle, weights).trainer
    before = {k: v.clone() for k, v in trainer._start.items()}
    start = trainer.fit().start_state
    for k, v in before.items():
        if not k.startswith("head."):
            assert torch.equal(start[k], v), k
    assert torch.allclose(start["stem.0.weight"], source.stem[0].weight.sum(1, keepdim=True))


def test_spearman_is_exact_and_the_wording_rule() -> None:
    rho, p, test = rt.spearman([1, 2, 3, 4], [4, 3, 2, 1])
    assert (rho, test) == (pytest.approx(-1.0), "exact") and p == pytest.approx(2 / 24)
    assert rt.verdict(rho, p) == "not significantly correlated"  # 4 groups: p >= 0.083
    rho, p, _ = rt.spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert p == pytest.approx(2 / 120) and rt.verdict(rho, p) == "anti-correlated"
    assert rt.verdict(1.0, 2 / 120) == "correlated"
    x = np.arange(12.0)
    y = x + np.sin(7 * x) * 4
    assert rt.spearman(x, y)[1:] == (pytest.approx(sps.spearmanr(x, y).pvalue),
                                     "t-approximation")


def _tables(groups: list[str], t: list[float], lrs: dict[str, list[float]]
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    trans = pd.DataFrame([{"run_id": "f", "dataset_key": "d@16", "strategy_label": "full",
                           "strategy": "full", "seed": 0, "group": g, "transferability": v}
                          for g, v in zip(groups, t, strict=True)])
    hist = pd.DataFrame([{"run_id": s, "dataset_key": "d@16", "strategy_label": s,
                          "strategy": s, "seed": 0, "key": f"lr/{g}", "step": step,
                          "value": v * (1 + step * (s == "meta"))}
                         for s, values in lrs.items() for g, v in zip(groups, values,
                                                                      strict=True)
                         for step in (0, 1)])
    return trans, hist


def test_lr_against_transferability_uses_full_fine_tuning_and_says_why_not() -> None:
    groups = ["stem", "b1", "b2", "b3", "b4", "head"]
    trans, hist = _tables(groups[:5], [9, 7, 5, 3, 1],
                          {"full": [1e-3] * 5, "meta": [1e-5, 2e-5, 3e-5, 4e-5, 5e-5]})
    # the strategy's own T would say the opposite: it must not be used
    own = trans.assign(run_id="meta", strategy_label="meta", strategy="meta",
                       transferability=[1, 3, 5, 7, 9])
    out = rt.lr_against_transferability(pd.concat([trans, own]), rt.mean_lrs(hist), groups)
    assert out.notes == []
    row = out.correlations.iloc[0]
    assert (row["strategy_label"], row["rho"], row["p"]) == ("meta", pytest.approx(-1.0),
                                                             pytest.approx(2 / 120))
    assert row["sentence"] == ("On d@16, meta's learned LRs are anti-correlated with "
                               "transferability (ρ = -1.00, p = 0.017; Spearman over 5 layer "
                               "groups, exact p, T of full fine-tuning).")
    assert list(out.points["group"]) == groups[:5]

    none = rt.lr_against_transferability(trans, rt.mean_lrs(hist[hist["run_id"] == "full"]),
                                         groups)
    assert none.correlations.empty and "no per-layer learning rates" in none.notes[0]
    few, few_hist = _tables(groups[:2], [3, 1], {"meta": [1e-5, 2e-5]})
    out = rt.lr_against_transferability(few, rt.mean_lrs(few_hist), groups)
    assert out.correlations.empty and "needs at least 3" in out.notes[0]
    out = rt.lr_against_transferability(own, rt.mean_lrs(hist), groups)
    assert out.correlations.empty and "no full fine-tuning run" in out.notes[0]


# -- through the runner and the report ------------------------------------------------------


def _bench(tiny_config: dict[str, Any], model: dict[str, Any], strategies: list[str],
           tmp_path: Path) -> tuple[Any, Any, Path]:
    cfg = validate_config(tiny_config | {"model": model, "strategies": strategies,
                                         "seeds": [0], "epochs": 2})
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed, [r.error for r in outcome.failed]
    paths = build_report(cfg.tracking_uri, cfg.name, parent_run_id=outcome.parent_run_id,
                         output_dir=tmp_path / "reports", log_artifacts=False)
    return cfg, outcome, paths.html


def _exact_spearman_p(x: list[float], y: list[float]) -> float:
    """Two-sided p of Spearman's ρ over all pairings, enumerated (no scipy permutation_test)."""
    rho = sps.spearmanr(x, y).statistic
    null = [sps.spearmanr(x, perm).statistic for perm in itertools.permutations(y)]
    lower = np.mean([v <= rho + 1e-12 for v in null])
    upper = np.mean([v >= rho - 1e-12 for v in null])
    return min(1.0, 2 * min(lower, upper))


@pytest.mark.slow
def test_pretrained_run_logs_transferability_and_the_report_checks_out(
        tiny_config: dict[str, Any], tmp_path: Path) -> None:
    model = {"arch": "smallcnn", "weights": "pretrain",
             "pretrain": {"epochs": 1, "options": {"n_images": 64}}}
    cfg, outcome, html = _bench(tiny_config, model, ["full", "metalr", "layer_decay"], tmp_path)
    client = MlflowClient(cfg.tracking_uri)
    runs = {r.cell.strategy: client.get_run(r.run_id) for r in outcome.results}
    backbone = ["stem", "block1", "block2", "block3"]
    for run in runs.values():
        logged = {k.removeprefix("transferability/") for k in run.data.metrics
                  if k.startswith("transferability/")}
        assert logged == {*backbone, "mean_backbone"}  # never the head
        t = [run.data.metrics[f"transferability/{g}"] for g in backbone]
        assert all(math.isfinite(v) and v > 0 for v in t)
        assert run.data.metrics["transferability/mean_backbone"] == pytest.approx(np.mean(t))
        assert run.data.params["transferability_reference"] == tr.PRETRAIN_START

    soup = BeautifulSoup(html.read_text(encoding="utf-8"), "html.parser")
    alts = {img["alt"] for img in soup.select("img.metalr-figure")}
    assert {"transferability per layer group", "learning rate against transferability"} <= alts
    text = soup.get_text(" ")
    assert "Traceback" not in text
    assert "synthetic@16: θ_r = the pre-training's own random start" in text  # the label
    full_t = [runs["full"].data.metrics[f"transferability/{g}"] for g in backbone]
    pattern = (r"On synthetic@16, {}'s (learned LRs|per-layer LRs \(fixed during training\)) are "
               r"(anti-correlated|correlated|not significantly correlated) with transferability \(ρ = (-?[\d.]+), "
               r"p = ([\d.e+-]+); Spearman over 4 layer groups")
    for strategy, wording in (("metalr", "learned LRs"),
                              ("layer_decay", "per-layer LRs (fixed during training)")):
        found = re.search(pattern.format(re.escape(runs[strategy].data.tags["strategy_label"])),
                          text)
        assert found, f"no sentence for {strategy}"
        lrs = [np.mean([m.value for m in client.get_metric_history(
            runs[strategy].info.run_id, f"lr/{g}")]) for g in backbone]
        rho, p = sps.spearmanr(full_t, lrs).statistic, _exact_spearman_p(full_t, lrs)
        assert found.group(1) == wording
        assert float(found.group(3)) == pytest.approx(rho, abs=0.006)
        assert float(found.group(4)) == pytest.approx(p, abs=6e-4)
        assert found.group(2) == ("not significantly correlated" if p >= 0.05 else
                                  "anti-correlated" if rho < 0 else "correlated")
    assert "On synthetic@16, full's" not in text  # one LR for every group: not layer-wise
    assert soup.select_one("table#lr-transferability") is not None


@pytest.mark.slow
def test_without_pretrained_weights_the_report_says_why(tiny_config: dict[str, Any],
                                                        tmp_path: Path) -> None:
    model = {"arch": "smallcnn", "weights": "none"}
    cfg, outcome, html = _bench(tiny_config, model, ["full", "layer_decay"], tmp_path)
    client = MlflowClient(cfg.tracking_uri)
    for r in outcome.results:
        run = client.get_run(r.run_id)
        assert not [k for k in run.data.metrics if k.startswith("transferability/")]
        assert "transferability_seed" not in run.data.params
    soup = BeautifulSoup(html.read_text(encoding="utf-8"), "html.parser")
    assert "transferability per layer group" not in {i["alt"] for i in
                                                     soup.select("img.metalr-figure")}
    text = " ".join(soup.get_text(" ").split())
    assert "No transferability: every run started from random weights" in text
    assert "needs pre-trained weights" in text



# -- θ_r: the pre-training's own random start (issue 23) --------------------------------------


def _pretrain_config(tiny_config: dict[str, Any], **model: Any) -> Any:
    return validate_config(tiny_config | {"model": {
        "arch": "smallcnn", "weights": "pretrain",
        "pretrain": {"epochs": 1, "options": {"n_images": 64}}, **model}})


def test_theta_r_is_the_pretrainings_first_state(tiny_config: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """θ_r is, bit for bit, the state the pre-training's model held before its first update
    (seen here by a spy on the cell builder the stage calls), not a fresh random draw."""
    from metalr_bench.benchmark.training import pretrain

    first: dict[str, torch.Tensor] = {}
    real_build = pretrain.build_parts

    def spy(*args: Any, **kwargs: Any) -> Any:
        built = real_build(*args, **kwargs)
        first.update({k: v.detach().clone() for k, v in built.model.state_dict().items()})
        return built

    monkeypatch.setattr(pretrain, "build_parts", spy)
    cfg = _pretrain_config(tiny_config)
    bundle = DataCache().get(Cell(cfg.datasets[0], "full", {}, 0))
    weights, _ = starting_weights(cfg, bundle, None, None, progress=False)
    assert first and weights is not None
    theta_r, kind = tr.reference_state(cfg, bundle)
    assert kind == tr.PRETRAIN_START
    backbone = [k for k in first if not k.startswith("head.")]
    assert backbone and all(torch.equal(theta_r[k], first[k]) for k in backbone)
    # the old θ_r (an independent draw) is not it, and the trained weights moved away from it
    old = tr.random_state("smallcnn", bundle.in_channels, bundle.num_outputs)
    assert not torch.equal(old["stem.0.weight"], first["stem.0.weight"])
    assert not torch.equal(weights["stem.0.weight"], first["stem.0.weight"])


def test_a_checkpoint_without_its_start_falls_back_to_a_random_draw(
        tiny_config: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A pre-training cached by an earlier version (no ``start`` in the file) stays usable; θ_r
    is then the fixed random draw and the run says so; external weights likewise."""
    from metalr_bench.benchmark.training.pretrain import checkpoint_path, pretrain_cache_dir

    cfg = _pretrain_config(tiny_config)
    bundle = DataCache().get(Cell(cfg.datasets[0], "full", {}, 0))
    path = checkpoint_path("smallcnn", cfg.model.pretrain, bundle.image_size,
                           pretrain_cache_dir(cfg))
    path.parent.mkdir(parents=True)
    old_model = build_model("smallcnn", bundle.in_channels, 3).state_dict()
    torch.save({"model": old_model, "arch": "smallcnn", "key": "old"}, path)  # old format
    weights, _ = starting_weights(cfg, bundle, None, None, progress=False)
    assert torch.equal(weights["stem.0.weight"], old_model["stem.0.weight"])  # reused as is
    theta_r, kind = tr.reference_state(cfg, bundle)
    drawn = tr.random_state("smallcnn", bundle.in_channels, bundle.num_outputs)
    assert kind == tr.RANDOM_DRAW and all(torch.equal(theta_r[k], drawn[k]) for k in drawn)
    assert "does not keep its random start" in caplog.text

    external = validate_config(tiny_config | {"model": {"arch": "smallcnn",
                                                        "weights": str(path)}})
    assert tr.reference_state(external, bundle)[1] == tr.RANDOM_DRAW


def test_runs_log_what_theta_r_was_the_mechanism_tag_and_trainable_params(
        tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell run logs ``n_trainable_params`` (counted here from the layer groups) and its
    strategy's ``mechanism`` as a tag (none for a strategy without one); a pre-trained run
    logs ``transferability_reference: pretrain_start`` and no ``transferability_seed``."""
    from metalr_bench.strategies.core.registry import get_strategy

    monkeypatch.setattr(get_strategy("last_k"), "mechanism", "trainable_share")
    monkeypatch.setattr(get_strategy("full"), "mechanism", None)
    cfg = _pretrain_config(tiny_config | {"strategies": ["full", "last_k"], "seeds": [0],
                                          "epochs": 1})
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed, [r.error for r in outcome.failed]
    client = MlflowClient(cfg.tracking_uri)
    runs = {r.cell.strategy: client.get_run(r.run_id) for r in outcome.results}
    model = build_model("smallcnn", 1, 2)
    groups = layer_groups(model)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    last_two = sum(sizes[n] for g in groups[-2:] for n in g.params)  # last_k's default k = 2
    assert runs["full"].data.params["n_trainable_params"] == str(sum(sizes.values()))
    assert runs["last_k"].data.params["n_trainable_params"] == str(last_two)
    assert runs["last_k"].data.tags["mechanism"] == "trainable_share"
    assert "mechanism" not in runs["full"].data.tags
    for run in runs.values():
        assert run.data.params["transferability_reference"] == tr.PRETRAIN_START
        assert "transferability_seed" not in run.data.params


def test_theta_r_of_an_rgb_source_is_mapped_like_theta_a(tiny_config: dict[str, Any],
                                                         tmp_path: Path) -> None:
    """An RGB pre-training feeding a grey target: θ_A's stem is the trained RGB stem summed
    over its channels, so θ_r's stem is the pre-training's RGB start summed the same way."""
    from metalr_bench.benchmark.models.zoo import adapt_input_conv
    from metalr_bench.benchmark.training.pretrain import (
        checkpoint_path,
        pretrain_cache_dir,
        pretrain_start,
    )
    from test_folder import PATTERN, make_folder

    make_folder(tmp_path / "us", mode="RGB", videos=6, frames=4)
    cfg = validate_config(tiny_config | {"model": {"arch": "smallcnn", "weights": "pretrain",
                                                   "pretrain": {
        "dataset": "imagefolder", "root": str(tmp_path / "us"), "epochs": 1, "batch_size": 8,
        "options": {"group_pattern": PATTERN}}}})
    bundle = DataCache().get(Cell(cfg.datasets[0], "full", {}, 0))
    assert bundle.in_channels == 1
    starting_weights(cfg, bundle, None, None, progress=False)
    start = pretrain_start(checkpoint_path("smallcnn", cfg.model.pretrain, bundle.image_size,
                                           pretrain_cache_dir(cfg)))
    assert start is not None and start["stem.0.weight"].shape[1] == 3
    theta_r, kind = tr.reference_state(cfg, bundle)
    assert kind == tr.PRETRAIN_START
    assert torch.equal(theta_r["stem.0.weight"], adapt_input_conv(start["stem.0.weight"], 1))
    assert torch.equal(theta_r["block3.0.weight"], start["block3.0.weight"])
