"""Each baseline strategy does what its formula says, checked on a real model and optimizer."""

from __future__ import annotations

import pytest
import torch
from metalr_bench.benchmark.models.zoo import build_model
from metalr_bench.strategies import TrainSettings, available_strategies, get_strategy
from metalr_bench.strategies.core.layers import layer_groups


def _setup(name: str, params: dict | None = None, arch: str = "smallcnn", lr: float = 1e-2):
    torch.manual_seed(0)
    model = build_model(arch, 1, 2)
    groups = layer_groups(model)
    strategy = get_strategy(name)(params, model, groups, TrainSettings(lr=lr, optimizer="sgd",
                                                                       weight_decay=0.0))
    return model, groups, strategy, strategy.build_optimizer()


def _train_steps(model, strategy, optimizer, n: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        strategy.set_train_mode(model)
        x = torch.randn(8, 1, 16, 16, generator=g)
        y = torch.randint(0, 2, (8,), generator=g)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        extra = strategy.loss_term(model)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()


def test_full_updates_every_group() -> None:
    model, groups, strategy, opt = _setup("full")
    before = {k: v.clone() for k, v in model.named_parameters()}
    _train_steps(model, strategy, opt)
    for g in groups:
        assert any(not torch.equal(before[p], dict(model.named_parameters())[p]) for p in g.params)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_last_k_freezes_weights_and_bn_statistics(k: int) -> None:
    model, groups, strategy, opt = _setup("last_k", {"k": k})
    state_before = {n: t.clone() for n, t in model.state_dict().items()}
    _train_steps(model, strategy, opt)
    state_after = model.state_dict()
    frozen = groups[: len(groups) - k]
    for g in frozen:
        prefixes = tuple(m + "." for m in g.modules)
        keys = [n for n in state_before if n.startswith(prefixes)]
        assert keys
        for n in keys:  # weights AND BatchNorm running stats / counters
            assert torch.equal(state_before[n], state_after[n]), n
    for g in groups[len(groups) - k:]:
        assert any(not torch.equal(state_before[p], state_after[p]) for p in g.params)
    assert sum(len(pg["params"]) for pg in opt.param_groups) == sum(
        len(g.params) for g in groups[len(groups) - k:])


def test_last_k_larger_than_groups_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"k=9 is larger than the model's 5 layer groups"):
        _setup("last_k", {"k": 9})


def test_l2sp_penalty_equals_formula() -> None:
    alpha, beta = 0.3, 0.05
    model, groups, strategy, opt = _setup("l2sp", {"alpha": alpha, "beta": beta})
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert strategy.loss_term(model).item() == pytest.approx(
        0.5 * beta * sum(float((p**2).sum()) for n, p in model.named_parameters()
                         if n.startswith("head.") and p.ndim > 1)
    )
    _train_steps(model, strategy, opt)
    head = set(groups[-1].params)
    expected_sp = sum(
        float(((p - start[n]) ** 2).sum()) for n, p in model.named_parameters()
        if n not in head and p.ndim > 1  # conv weights only: BN and biases are excluded
    )
    expected_head = sum(float((p**2).sum()) for n, p in model.named_parameters()
                        if n in head and p.ndim > 1)
    got = strategy.loss_term(model).item()
    assert got == pytest.approx(0.5 * alpha * expected_sp + 0.5 * beta * expected_head, rel=1e-5)
    assert expected_sp > 0
    assert all(pg["weight_decay"] == 0.0 for pg in opt.param_groups)


def test_l2sp_penalty_gradient_pulls_towards_start() -> None:
    model, groups, strategy, _ = _setup("l2sp", {"alpha": 1.0, "beta": 0.0})
    w = model.block1[0].weight
    w0 = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    strategy.loss_term(model).backward()
    assert torch.allclose(w.grad, w.detach() - w0)  # d/dw 1/2||w - w0||^2


@pytest.mark.parametrize("decay", [0.5, 0.75, 1.0])
def test_layer_decay_lrs_equal_formula(decay: float) -> None:
    lr = 0.01
    model, groups, strategy, opt = _setup("layer_decay", {"decay": decay}, arch="resnet18", lr=lr)
    n = len(groups)
    assert [pg["lr"] for pg in opt.param_groups] == pytest.approx(
        [lr * decay ** (n - 1 - g) for g in range(n)]
    )
    assert opt.param_groups[-1]["name"] == "head" and opt.param_groups[-1]["lr"] == lr
    assert strategy.log_values()["lr/stem"] == pytest.approx(lr * decay ** (n - 1))


def test_layer_decay_lr_is_what_the_optimizer_applies() -> None:
    model, groups, strategy, opt = _setup("layer_decay", {"decay": 0.5}, lr=0.1)
    stem = model.stem[0].weight
    before = stem.detach().clone()
    _train_steps(model, strategy, opt, n=1)
    # plain SGD without momentum history on the first step: delta = -lr_stem * grad
    assert torch.allclose(stem.detach(), before - 0.1 * 0.5 ** 4 * stem.grad, atol=1e-7)


@pytest.mark.parametrize(("name", "params"), [
    pytest.param(n, p, id=f"{n}-{i}") for n in available_strategies()
    for i, p in enumerate(get_strategy(n).test_params)])
def test_every_strategy_accepts_its_test_params(name: str, params: dict) -> None:
    _setup(name, params)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_l2sp_turns_off_plain_weight_decay_when_the_base_setting_has_one(optimizer: str) -> None:
    torch.manual_seed(0)
    model = build_model("smallcnn", 1, 2)
    strategy = get_strategy("l2sp")(None, model, layer_groups(model), TrainSettings(
        lr=1e-2, optimizer=optimizer, weight_decay=1e-2))
    opt = strategy.build_optimizer()
    assert {id(p) for pg in opt.param_groups for p in pg["params"]} == {
        id(p) for p in model.parameters()}  # every parameter is trained, so every one is checked
    assert [pg["weight_decay"] for pg in opt.param_groups] == [0.0] * len(opt.param_groups)


def _l2sp_penalty_grad(model, groups, w0: dict[str, torch.Tensor], alpha: float, beta: float
                       ) -> dict[str, torch.Tensor]:
    """d/dw of α/2·||w_S − w_S⁰||² + β/2·||w_head||², by hand: conv/linear weights only."""
    head = set(groups[-1].params)
    out = {}
    for n, p in model.named_parameters():
        if p.ndim <= 1:  # biases and BatchNorm: not regularised
            out[n] = torch.zeros_like(p)
        else:
            out[n] = beta * p.detach() if n in head else alpha * (p.detach() - w0[n])
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_l2sp_step_is_task_plus_penalty_gradient_only(optimizer: str) -> None:
    """With a non-zero base weight_decay, one step moves each parameter by exactly what the
    task gradient plus the L2-SP penalty gradient give: the penalty is the only regulariser."""
    alpha, beta, lr, wd = 0.3, 0.05, 0.1, 1e-2
    torch.manual_seed(0)
    model = build_model("smallcnn", 1, 2).double()
    groups = layer_groups(model)
    strategy = get_strategy("l2sp")({"alpha": alpha, "beta": beta}, model, groups, TrainSettings(
        lr=lr, optimizer=optimizer, weight_decay=wd, momentum=0.0))
    opt = strategy.build_optimizer()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # move away from the start so the backbone pull is not zero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pen = _l2sp_penalty_grad(model, groups, w0, alpha, beta)
    assert sum(int(g.count_nonzero()) for g in pen.values()) > 0

    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    strategy.set_train_mode(model)
    opt.zero_grad()
    task = torch.nn.functional.cross_entropy(model(x), y)
    names = [n for n, _ in model.named_parameters()]
    task_grad = dict(zip(names, torch.autograd.grad(task, list(model.parameters()),
                                                    retain_graph=True), strict=True))
    (task + strategy.loss_term(model)).backward()
    opt.step()

    for n, p in model.named_parameters():
        total = task_grad[n] + pen[n]
        assert torch.allclose(p.grad, total, rtol=0, atol=1e-12), n  # loss_term's gradient
        if optimizer == "sgd":  # momentum 0: Δw = −lr·g
            expected = before[n] - lr * total
        else:  # Adam's first step: m̂ = g, v̂ = g², Δw = −lr·g / (|g| + ε)
            expected = before[n] - lr * total / (total.abs() + 1e-8)
        # plain decay on top would add lr·wd·w (SGD) or change g (Adam): far above the tolerance
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-10), n
