"""Every point a study may sample is a configuration its strategy accepts, and the paper config
holds the public MetaLR code's settings.

A search space that lets in invalid points costs trials: before ``Strategy.constrain_space``,
MetaLR searched lr up to 1e-1 while refusing any lr above its lr_max (1e-2), so about a quarter
of its trials failed at construction.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from metalr_bench.benchmark.config import load_config, validate_config
from metalr_bench.benchmark.models.zoo import build_model
from metalr_bench.benchmark.tuning.space import search_space, suggest
from metalr_bench.strategies import TrainSettings, available_strategies, get_strategy
from metalr_bench.strategies.core.layers import layer_groups
from torch import nn

N_POINTS = 200
PAPER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "metalr-paper.yaml"


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return build_model("resnet18", 3, 2)


def _sample_and_build(name: str, model: nn.Module, fixed: dict[str, Any] | None = None,
                      n: int = N_POINTS) -> list[str]:
    """Sample ``n`` points of ``name``'s space (with ``fixed`` params) with a real Optuna study
    and construct the strategy at each; return the failures.

    One copy of ``model`` per call, not per point (a resnet18 deep copy costs more than all the
    constructions): a constructor may freeze parameters (last_k) or snapshot the weights
    (l2sp), so ``requires_grad`` is reset before each point and nothing else carries over."""
    model = copy.deepcopy(model)
    groups = layer_groups(model)
    space = (search_space(name, len(groups)) if fixed is None
             else search_space(name, len(groups), fixed=fixed))
    untuned = {k: v for k, v in (fixed or {}).items() if k not in space and k != "lr"}
    base_lr = (fixed or {}).get("lr", 1e-3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    failures = []
    for _ in range(n):
        trial = study.ask()
        params, overrides = suggest(trial, space)
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            get_strategy(name)({**untuned, **params}, model, groups,
                               TrainSettings(lr=overrides.get("lr", base_lr)))
        except ValueError as exc:
            failures.append(f"{params} {overrides}: {exc}")
        study.tell(trial, 0.0)
    return failures


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("name", available_strategies())
def test_every_sampled_point_builds(name: str, resnet18: nn.Module) -> None:
    failures = _sample_and_build(name, resnet18)
    assert not failures, f"{len(failures)}/{N_POINTS} points of {name!r} fail:\n" + "\n".join(
        failures[:5])


@pytest.mark.parametrize("fixed", [
    {"backbone_lr_scale": 0.01},          # backbone starts at lr/100: lr must be >= 1e-4
    {"lr_max": 1e-3},                     # head starts at lr: lr must be <= 1e-3
    {"lr_min": 1e-4, "lr_max": 5e-2},     # lr >= 1e-3 (backbone >= 1e-4), up to 1e-2 declared
    {"backbone_lr_scale": 0.3, "lr_min": 1e-5},
])
def test_metalr_space_follows_its_fixed_params(fixed: dict[str, Any], resnet18: nn.Module) -> None:
    failures = _sample_and_build("metalr", resnet18, fixed, n=100)
    assert not failures, f"{len(failures)}/100 fail with {fixed}:\n" + "\n".join(failures[:5])


def test_metalr_searched_scale_narrows_lr(resnet18: nn.Module) -> None:
    """A searched backbone_lr_scale counts at its worst case: lr in [1e-6/0.01, 1e-2]."""
    cfg = validate_config({"tune": {"params": {"metalr": {
        "backbone_lr_scale": {"low": 0.01, "high": 1.0, "log": True}}}}})
    groups = layer_groups(resnet18)
    space = search_space("metalr", len(groups), cfg.tune.params)
    assert space["lr"].low == pytest.approx(1e-4) and space["lr"].high == pytest.approx(1e-2)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(100):
        trial = study.ask()
        params, overrides = suggest(trial, space)
        get_strategy("metalr")(params, resnet18, groups, TrainSettings(lr=overrides["lr"]))
        study.tell(trial, 0.0)


def test_paper_config_has_the_public_codes_settings() -> None:
    cfg = load_config(PAPER_CONFIG)
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.optimizer, cfg.weight_decay) == (
        0.01, 128, 30, "adam", 1e-4)
    assert [d.size for d in cfg.datasets] == [64] and cfg.model.arch == "resnet18"
    assert {"full", "last_k", "l2sp", "layer_decay", "metalr"} <= {s.name for s in cfg.strategies}
    cells = [c for c in cfg.cells() if c.strategy == "metalr"]
    assert cells and all(c.params["hyper_lr"] == 0.1 for c in cells)
    model = build_model(cfg.model.arch, 1, 2)
    groups = layer_groups(model)
    metalr = get_strategy("metalr")(cells[0].params, model, groups, TrainSettings(lr=cfg.lr))
    # the public code: now_lr = [0.1 * lr] * 9 + [lr] with lr = 0.01
    assert len(groups) == 10
    assert torch.allclose(metalr.alpha, torch.tensor([1e-3] * 9 + [1e-2]))
