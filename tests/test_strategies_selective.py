"""LP-FT, surgical fine-tuning and Auto-RGN do what their papers' rules say, checked through the
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
from metalr_bench.benchmark.training.cell import build
from metalr_bench.benchmark.training.trainer import EpochCallback, TrainerOptions
from metalr_bench.strategies import StepContext, TrainSettings, get_strategy
from metalr_bench.strategies.core.layers import layer_groups
from torch import nn


class Snapshots(EpochCallback):
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
    built = build("smallcnn", 1, 2, strategy, params, settings, bundle=bundle,
                  options=TrainerOptions(epochs=epochs, batch_size=16, augment=False,
                                         precise_bn=precise_bn, evaluate_test=False))
    assert built.trainer is not None
    return built


def _keys(state: dict[str, torch.Tensor], modules: tuple[str, ...]) -> list[str]:
    prefixes = tuple(m + "." for m in modules)
    return [k for k in state if k.startswith(prefixes)]


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
             keys: list[str]) -> list[str]:
    return [k for k in keys if not torch.equal(before[k], after[k])]


# -- LP-FT ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, weight_decay", [
    ("adam", 0.0), ("adamw", 0.1), ("sgd", 0.1), ("adam", 0.1),
])
def test_lp_ft_probes_the_head_then_fine_tunes_everything(optimizer, weight_decay) -> None:
    """Through the trainer's loop (PreciseBN on): during the probe epochs only the head changes,
    every backbone weight *and* BatchNorm buffer stays the pre-trained one, even with weight
    decay; from the switch on every layer group trains and BatchNorm statistics move."""
    built = _trainer("lp_ft", {"probe_epochs": 2}, epochs=3, optimizer=optimizer,
                     weight_decay=weight_decay)
    trainer, groups = built.trainer, built.groups
    start = {k: v.detach().clone() for k, v in built.model.state_dict().items()}
    # the optimizer is built once: it holds every parameter from the start
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(
        list(built.model.parameters()))
    snaps = Snapshots(built.model)
    trainer.callbacks.append(snaps)
    result = trainer.fit()

    head, backbone = groups[-1], groups[:-1]
    for probe_end in snaps.states[:2]:
        for g in backbone:
            keys = _keys(start, g.modules)
            assert keys
            assert not _changed(start, probe_end, keys), g.name
        assert _changed(start, probe_end, list(head.params)) == list(head.params)
    assert _changed(snaps.states[0], snaps.states[1], list(head.params))  # still probing

    tuned = snaps.states[2]
    for g in backbone:  # every group's weights moved after the switch
        assert _changed(snaps.states[1], tuned, list(g.params)), g.name
    bn_stats = [k for k in start if k.endswith("running_mean")]
    assert bn_stats and all(_changed(snaps.states[1], tuned, [k]) for k in bn_stats)

    lrs = [{k: v for k, v in h.items() if k.startswith("lr/")} for h in result.history]
    assert lrs[0]["lr/head"] == lrs[2]["lr/head"] == 1e-2
    assert all(lrs[e][f"lr/{g.name}"] == 0.0 for e in (0, 1) for g in backbone)
    assert all(lrs[2][f"lr/{g.name}"] == 1e-2 for g in backbone)


def test_lp_ft_switch_is_resume_safe() -> None:
    """The phase follows the epoch number: the optimizer state is cleared at the switch epoch
    only (a run resumed later keeps its fine-tuning state), and every layer trains after it."""
    built = _trainer("lp_ft", {"probe_epochs": 1}, epochs=3)
    s, opt = built.strategy, built.trainer.optimizer
    assert s.probing and not any(p.requires_grad for p in s.backbone)
    x, y = next(iter(built.trainer.train_loader))
    built.trainer.train_step(x, y, epoch=0, step=0)
    assert opt.state  # the head's Adam moments
    s.on_epoch_start(1)
    assert not opt.state and all(p.requires_grad for p in s.backbone)
    built.trainer.train_step(x, y, epoch=1, step=1)
    n = len(opt.state)
    assert n == len(list(built.model.parameters()))
    s.on_epoch_start(2)  # later epochs (or a resume there) keep the state
    assert len(opt.state) == n


def test_lp_ft_needs_a_fine_tuning_epoch() -> None:
    with pytest.raises(ValueError, match=r"probe_epochs=3 leaves no fine-tuning epoch"):
        _trainer("lp_ft", {"probe_epochs": 3}, epochs=3)
    with pytest.raises(ValueError):
        get_strategy("lp_ft").Params(probe_epochs=0)


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
