"""The optimizer registry (``strategies.core.optim``): one definition per optimizer, the
config's choices are its keys, and what it builds steps as the formulas say."""

from __future__ import annotations

import pytest
import torch
from metalr_bench.benchmark.config import ConfigError, validate_config
from metalr_bench.benchmark.models.zoo import build_model
from metalr_bench.strategies import TrainSettings, get_strategy
from metalr_bench.strategies.core import optim
from metalr_bench.strategies.core.layers import layer_groups

LR, WD, MOMENTUM, EPS = 0.1, 0.01, 0.9, 1e-8


@pytest.mark.parametrize("name", optim.optimizer_names())
def test_first_step_is_the_formula(name: str) -> None:
    """Two groups at their own LRs; the first step by hand: SGD p − lr·(g + λp) (its momentum
    buffer starts at g), Adam p − lr·g'/(|g'| + ε) with g' = g + λp, AdamW p(1 − lr·λ) −
    lr·g/(|g| + ε)."""
    torch.manual_seed(0)
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    settings = TrainSettings(lr=LR, weight_decay=WD, momentum=MOMENTUM, optimizer=name)
    opt = optim.create_optimizer([{"params": [pa], "lr": LR}, {"params": [pb], "lr": LR / 10}],
                                 settings, name)
    assert [g["lr"] for g in opt.param_groups] == [LR, LR / 10]
    assert all(g["weight_decay"] == WD for g in opt.param_groups)
    if name == "sgd":
        assert all(g["momentum"] == MOMENTUM for g in opt.param_groups)
    ga, gb = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    pa.grad, pb.grad = ga.clone(), gb.clone()
    opt.step()
    for p, p0, g, lr in ((pa, a, ga, LR), (pb, b, gb, LR / 10)):
        if name == "sgd":
            want = p0 - lr * (g + WD * p0)
        elif name == "adam":
            gw = g + WD * p0
            want = p0 - lr * gw / (gw.abs() + EPS)
        else:
            want = p0 * (1 - lr * WD) - lr * g / (g.abs() + EPS)
        assert torch.allclose(p.detach(), want, rtol=0, atol=1e-12), name


def test_unknown_name_lists_the_registry() -> None:
    with pytest.raises(ConfigError, match="unknown optimizer 'lion'; choose one of adam, adamw, sgd"):
        validate_config({"optimizer": "lion"})
    with pytest.raises(ValueError, match="choose one of adam, adamw, sgd"):
        get_strategy("metalr").Params(optimizer="lion")


def _rmsprop(groups, s, **extra):
    return torch.optim.RMSprop(groups, lr=s.lr, weight_decay=s.weight_decay, **extra)


def test_a_registered_optimizer_is_a_choice_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a name is the one edit: the config accepts it, and both the base class and
    MetaLR (which used to keep their own if-chains) build it."""
    monkeypatch.setitem(optim.OPTIMIZERS, "rmsprop", _rmsprop)
    cfg = validate_config({"optimizer": "rmsprop", "strategies": [
        {"name": "metalr", "params": {"optimizer": "rmsprop"}}]})
    assert cfg.optimizer == "rmsprop"
    settings = TrainSettings(lr=1e-3, optimizer="rmsprop")
    for name in ("full", "metalr"):
        model = build_model("smallcnn", 1, 2)
        strategy = get_strategy(name)(None, model, layer_groups(model), settings)
        assert isinstance(strategy.build_optimizer(), torch.optim.RMSprop), name
