"""Surgical fine-tuning, last-k and Auto-RGN do what their papers' rules say, checked through the
trainer's own loop where the rule is about what the trainer trains."""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import pytest
import torch
from metalr_bench.benchmark.models.zoo import build_model
from metalr_bench.benchmark.perf.bench_throughput import random_bundle
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.trainer import TrainerCallback, TrainerSettings
from metalr_bench.strategies import StepContext, TrainSettings, get_strategy
from metalr_bench.strategies.core.layers import layer_groups
from torch import nn


class Snapshots(TrainerCallback):
    """The model's full state (weights and BatchNorm buffers) at the end of every epoch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.states: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.states.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})


def _trainer(strategy: str, params: dict[str, Any], *, epochs: int, optimizer: str = "adam",
             weight_decay: float = 0.0, lr: float = 1e-2, precise_bn: bool = True):
    torch.manual_seed(0)
    bundle = random_bundle(16, 64, channels=1)
    settings = TrainSettings(lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                             epochs=epochs)
    built = build_parts("smallcnn", 1, 2, strategy, params, settings, bundle=bundle,
                  trainer_settings=TrainerSettings(epochs=epochs, batch_size=16, augment=False,
                                                   precise_bn=precise_bn, evaluate_test=False))
    assert built.trainer is not None
    return built


def _keys(state: dict[str, torch.Tensor], modules: tuple[str, ...]) -> list[str]:
    prefixes = tuple(m + "." for m in modules)
    return [k for k in state if k.startswith(prefixes)]


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
             keys: list[str]) -> list[str]:
    return [k for k in keys if not torch.equal(before[k], after[k])]


# -- LP-FT: its probe is tested with the shared probe in tests/test_probe.py -----------------------


# -- surgical ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks, tuned", [
    (2, ["block1", "head"]),
    ("block2", ["block2", "head"]),
    (["stem", 4], ["stem", "block3", "head"]),
    (5, ["head"]),
])
def test_surgical_trains_only_the_chosen_groups_and_the_head(blocks, tuned) -> None:
    """Through the trainer (PreciseBN on): the frozen groups keep every weight and BatchNorm
    buffer; the chosen groups and the head change, BatchNorm statistics included."""
    built = _trainer("surgical", {"blocks": blocks}, epochs=2)
    start = {k: v.detach().clone() for k, v in built.model.state_dict().items()}
    built.trainer.fit()
    end = built.model.state_dict()  # the selected checkpoint, trained for at least one epoch
    for g in built.groups:
        keys = _keys(start, g.modules)
        if g.name in tuned:
            assert _changed(start, end, list(g.params)) == list(g.params), g.name
            stats = [k for k in keys if k.endswith("running_var")]
            assert all(_changed(start, end, [k]) for k in stats), g.name
        else:
            assert keys and not _changed(start, end, keys), g.name
    opt_params = {id(p) for pg in built.trainer.optimizer.param_groups for p in pg["params"]}
    named = dict(built.model.named_parameters())
    assert opt_params == {id(named[p]) for g in built.groups if g.name in tuned
                          for p in g.params}


@pytest.mark.parametrize("precise_bn", [True, False])
def test_surgical_frozen_groups_keep_the_source_batchnorm_statistics(precise_bn: bool) -> None:
    """After a training epoch (PreciseBN on or off): running_mean/var of every BatchNorm in a
    frozen group are the source's, bit for bit; those of the trained group have moved."""
    built = _trainer("surgical", {"blocks": "block2"}, epochs=1, precise_bn=precise_bn)
    start = {k: v.detach().clone() for k, v in built.model.state_dict().items()}
    built.trainer.fit()
    end = built.model.state_dict()
    for g in built.groups:
        stats = [k for k in _keys(start, g.modules) if k.endswith(("running_mean", "running_var"))]
        if g.name == "head":
            continue
        assert stats, g.name
        moved = _changed(start, end, stats)
        assert moved == (stats if g.name == "block2" else []), g.name


@pytest.mark.parametrize("strategy, params", [("surgical", {"blocks": 2}),
                                              ("surgical", {"blocks": ["stem", 4]}),
                                              ("last_k", {"k": 2}), ("last_k", {"k": 1})])
def test_selective_strategies_log_the_trained_parameter_count(strategy, params) -> None:
    """``trainable_params`` = elements of the trained groups' parameters (counted by hand from
    the groups), ``trainable_share`` = that / all parameters; logged every epoch."""
    built = _trainer(strategy, params, epochs=1)
    s = built.strategy
    assert s.mechanism == "trainable_share"
    named = dict(built.model.named_parameters())
    trained = ({built.groups[i].name for i in s.trained} if strategy == "surgical"
               else {g.name for g in built.groups[len(built.groups) - params["k"]:]})
    count = sum(named[p].numel() for g in built.groups if g.name in trained for p in g.params)
    total = sum(p.numel() for p in built.model.parameters())
    history = built.trainer.fit().history
    assert 0 < count < total
    for record in history:
        assert record["trainable_params"] == count
        assert record["trainable_share"] == pytest.approx(count / total)


def test_surgical_block_is_tuned_over_every_layer_group() -> None:
    """The search space covers every layer group (1 = stem .. groups = head only), each point a
    different trained set; the untuned default is 2 (the first block after the stem)."""
    from metalr_bench.benchmark.tuning.space import search_space

    model = build_model("resnet18", 1, 2)
    groups = layer_groups(model)
    space = search_space("surgical", len(groups))
    dim = space["blocks"]
    assert dim.type == "int" and (dim.low, dim.high) == (1, len(groups))
    cls = get_strategy("surgical")
    seen = set()
    for position in range(1, len(groups) + 1):
        for p in model.parameters():
            p.requires_grad_(True)
        seen.add(tuple(cls({"blocks": position}, model, groups, TrainSettings()).trained))
    assert len(seen) == len(groups)
    assert cls.Params().blocks == 2


def test_surgical_names_positions_and_errors() -> None:
    model = build_model("resnet18", 3, 2)
    groups = layer_groups(model)
    cls = get_strategy("surgical")

    def trained(blocks: Any) -> list[str]:
        for p in model.parameters():
            p.requires_grad_(True)
        s = cls({"blocks": blocks}, model, groups, TrainSettings())
        return [groups[i].name for i in s.trained]

    assert trained(2) == ["layer1.0", "head"]  # the default: the first block after the stem
    assert cls.Params().blocks == 2
    assert trained("layer1") == ["layer1.0", "layer1.1", "head"]  # a stage, as in the paper
    assert trained(["stem", "layer1"]) == ["stem", "layer1.0", "layer1.1", "head"]
    assert trained(10) == ["head"]
    with pytest.raises(ValueError, match=r"position 11 is not one of the model's 10"):
        trained(11)
    with pytest.raises(ValueError, match=r"no layer group is named 'layer9'"):
        trained("layer9")
    with pytest.raises(ValueError, match=r"start\w* at 1"):
        cls.Params(blocks=0)
    with pytest.raises(ValueError):
        cls.Params(blocks=[])


# -- Auto-RGN ---------------------------------------------------------------------------------------
def _is_norm_param(model: nn.Module, name: str) -> bool:
    return isinstance(model.get_submodule(name.rpartition(".")[0]), nn.BatchNorm2d)


def _expected_rates(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    lr: float) -> tuple[dict[str, float], dict[str, float]]:
    """By hand, on a copy: per group, the mean over batches of ||grad|| / ||weights|| over its
    non-BatchNorm parameters; lr · RGN / max RGN."""
    ref = copy.deepcopy(model).train()
    groups = layer_groups(ref)
    rgn = {g.name: 0.0 for g in groups}
    for x, y in batches:
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        named = dict(ref.named_parameters())
        for g in groups:
            kept = [named[p] for p in g.params if not _is_norm_param(ref, p)]
            gn = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in kept))
            wn = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in kept))
            rgn[g.name] += gn / wn / len(batches)
    top = max(rgn.values())
    return rgn, {k: lr * v / top for k, v in rgn.items()}


@pytest.mark.parametrize("n_batches", [1, 3])
def test_auto_rgn_rates_follow_the_formula(n_batches: int) -> None:
    """On fixed batches: the optimizer's group LRs are lr · RGN_g / max RGN computed by hand
    (autograd on a copy, BatchNorm parameters left out); the measurement leaves the weights,
    their gradients and the BatchNorm buffers untouched; the rates are set once per epoch."""
    torch.manual_seed(0)
    lr = 3e-3
    model = build_model("smallcnn", 1, 2).train()
    groups = layer_groups(model)
    strategy = get_strategy("auto_rgn")({"rgn_batches": n_batches}, model, groups,
                                         TrainSettings(lr=lr, optimizer="adam"))
    opt = strategy.build_optimizer()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 2, (8,), generator=g))
               for _ in range(n_batches)]
    rgn, expected = _expected_rates(model, batches, lr)
    drawn: list[int] = []

    def meta_batch() -> tuple[torch.Tensor, torch.Tensor]:
        drawn.append(1)
        return batches[(len(drawn) - 1) % n_batches]

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def ctx(epoch: int) -> StepContext:
        return StepContext(model=model, optimizer=opt, loss_fn=nn.functional.cross_entropy,
                           autocast=contextlib.nullcontext, epoch=epoch, step=0,
                           meta_batch=meta_batch)

    assert strategy.train_step(ctx(0), batches[0]) is None  # then the trainer's own step
    got = {pg["name"]: pg["lr"] for pg in opt.param_groups}
    assert set(got) == {g.name for g in groups}
    for name, want in expected.items():
        assert got[name] == pytest.approx(want, rel=1e-5), name
    assert max(got.values()) == pytest.approx(lr)
    assert len(set(got.values())) == len(groups)  # really per group, not one rate
    logged = strategy.log_values()
    for name in rgn:
        assert logged[f"rgn/{name}"] == pytest.approx(rgn[name], rel=1e-5)
        assert logged[f"lr/{name}"] == got[name]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # buffers too
    assert all(p.grad is None for p in model.parameters())

    strategy.train_step(ctx(0), batches[0])  # same epoch: no new measurement
    assert len(drawn) == n_batches
    strategy.train_step(ctx(1), batches[0])
    assert len(drawn) == 2 * n_batches


def test_auto_rgn_in_the_trainer_sets_rates_every_epoch() -> None:
    built = _trainer("auto_rgn", {"rgn_batches": 2}, epochs=2, lr=1e-2)
    result = built.trainer.fit()
    assert result.n_train_images == 64 and result.meta_source == "train"
    names = [g.name for g in built.groups]
    per_epoch = [[h[f"lr/{n}"] for n in names] for h in result.history]
    for rates in per_epoch:
        assert max(rates) == pytest.approx(1e-2) and min(rates) > 0
        assert all(f"rgn/{n}" in result.history[0] for n in names)
    assert per_epoch[0] != per_epoch[1]  # measured again at the new weights


def test_auto_rgn_state_round_trips() -> None:
    model = build_model("smallcnn", 1, 2)
    groups = layer_groups(model)
    cls = get_strategy("auto_rgn")
    a = cls({}, model, groups, TrainSettings())
    a.rgn.copy_(torch.arange(len(groups), dtype=torch.float32))
    a.epoch = 3
    b = cls({}, model, groups, TrainSettings())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.rgn, b.rgn) and b.epoch == 3
