"""LR-adapting strategies a reviewer asks for: HD (Baydin et al. 2018) per layer group, and
MetaLR as its public code runs it (ascending look-ahead, always the first training batch)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from metalr_bench.benchmark.models.zoo import SmallCNN
from metalr_bench.benchmark.perf.bench_throughput import random_bundle
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.trainer import TrainerSettings
from metalr_bench.datasets.core.tensors import to_float
from metalr_bench.strategies.core.base import StepContext, TrainSettings
from metalr_bench.strategies.core.layers import layer_groups
from metalr_bench.strategies.hd import HD
from metalr_bench.strategies.metalr import MetaLR
from metalr_bench.strategies.metalr_public import MetaLRPublic
from torch.func import functional_call


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def _null() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def tiny(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[SmallCNN, list]:
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, num_outputs=2, width=4).to(dtype)
    model.train()
    return model, layer_groups(model)


def batch(dtype: torch.dtype = torch.float64, n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=g, dtype=dtype),
            torch.randint(0, 2, (n,), generator=g))


def ctx_for(strategy, model, meta=None, epoch: int = 10) -> StepContext:
    return StepContext(model=model, optimizer=strategy.optimizer, loss_fn=ce, autocast=_null,
                       epoch=epoch, step=strategy.step,
                       meta_batch=None if meta is None else (lambda: meta))


# -- HD -----------------------------------------------------------------------------------------
HD_CASES = [  # (optimizer, momentum, weight decay, β)
    ("sgd", 0.0, 0.0, 1e-2),
    ("sgd", 0.9, 1e-2, 1e-2),
    ("adam", 0.9, 0.0, 1e-4),
    ("adam", 0.9, 1e-2, 1e-4),
    ("adamw", 0.9, 1e-1, 1e-4),
]


def _hd(kind: str, momentum: float, wd: float, beta: float, lr: float = 1e-2,
        dtype: torch.dtype = torch.float64, scope: str = "group") -> tuple[HD, SmallCNN, list]:
    model, groups = tiny(dtype)
    s = HD({"hyper_lr": beta, "scope": scope}, model, groups,
           TrainSettings(lr=lr, optimizer=kind, weight_decay=wd, momentum=momentum))
    s.build_optimizer()
    return s, model, groups


@pytest.mark.parametrize("scope", ["group", "global"])
@pytest.mark.parametrize("kind, momentum, wd, beta", HD_CASES)
def test_hd_lr_update_is_the_papers_formula_per_group(kind, momentum, wd, beta, scope) -> None:
    """Two steps with hand-set gradients G1, G2: step 1 has no previous direction (h = 0); at
    step 2 every group's rate moves by β·Σ_{p∈j}⟨g2, d1⟩ (scope group), or every rate by the
    sum over all groups, β·⟨g2, d1⟩ (scope global, the paper's one α), with d1 the direction
    step 1 applied, written out here from the optimizer's definition (not read from its
    state)."""
    s, model, groups = _hd(kind, momentum, wd, beta, scope=scope)
    named = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    g1 = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in named.items()}
    # step 2's gradient: partly along step 1's (the dot products are not ~0) plus noise
    g2 = {n: 0.5 * g1[n] + torch.randn(p.shape, generator=gen, dtype=p.dtype)
          for n, p in named.items()}
    theta0 = {n: p.detach().clone() for n, p in named.items()}
    alpha0 = s.alpha.clone()

    for n, p in named.items():
        p.grad = g1[n].clone()
    h1 = s.hyper_step(s.optimizer)
    assert torch.equal(h1, torch.zeros_like(h1)) and torch.equal(s.alpha, alpha0)
    s.optimizer.step()
    theta1 = {n: p.detach().clone() for n, p in named.items()}

    for n, p in named.items():
        p.grad = g2[n].clone()
    s.hyper_step(s.optimizer)

    eps = 1e-8
    expected = alpha0.clone()
    for j, group in enumerate(groups):
        for n in group.params:
            if kind == "adamw":  # decoupled decay: g is ∇L, d = Adam's u + λ·θ_{t−2}
                grad1, grad2 = g1[n], g2[n]
                d1 = grad1 / (grad1.abs() + eps) + wd * theta0[n]
            else:  # coupled decay: g = ∇L + λ·θ
                grad1, grad2 = g1[n] + wd * theta0[n], g2[n] + wd * theta1[n]
                # SGD (momentum or not): b1 = g1; Adam: m̂1 = g1, v̂1 = g1², u1 = g1/(|g1|+ε)
                d1 = grad1 if kind == "sgd" else grad1 / (grad1.abs() + eps)
            expected[j] += beta * (grad2 * d1).sum()
    assert (expected - alpha0).abs().min() > 0, "degenerate test: a group did not move"
    assert len(set((expected - alpha0).tolist())) == len(groups)  # distinct per group
    # the hypergrad logged per group is always the group's share
    torch.testing.assert_close(s.hypergrad, -(expected - alpha0) / beta, rtol=1e-7, atol=1e-12)
    if scope == "global":
        expected = alpha0 + (expected - alpha0).sum()
        assert len(set(s.alpha.tolist())) == 1
    torch.testing.assert_close(s.alpha, expected, rtol=1e-9, atol=1e-14)
    # the optimizer steps with the new rates
    lrs = torch.stack([torch.as_tensor(g["lr"]) for g in s.optimizer.param_groups]).double()
    torch.testing.assert_close(lrs, s.alpha, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("scope", ["group", "global"])
def test_hd_hypergradient_is_the_derivative_of_the_loss_wrt_the_rate(kind, scope) -> None:
    """h_t = ∂f_t(θ_{t−1}(α))/∂α, θ_{t−1} = θ_{t−2} − α·d_{t−1}: the rate update after step 2
    equals −β times a central finite difference of step 2's loss in the rate step 1 used, for
    one group's rate (scope group) or the one rate of every parameter (scope global)."""
    s, model, groups = _hd(kind, 0.0, 0.0, 1e-3, lr=1e-2, scope=scope)
    (x1, y1), (x2, y2) = batch(seed=1), batch(seed=2)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    s.train_step(ctx_for(s, model), (x1, y1))  # h_1 = 0: step 1 runs at α0 = lr
    named = dict(model.named_parameters())
    d1 = {n: (theta0[n] - named[n].detach()) / 1e-2 for n in named}  # what step 1 applied
    alpha0 = s.alpha.clone()
    s.optimizer.zero_grad()
    ce(model(x2), y2).backward()
    s.hyper_step(s.optimizer)

    def loss2(rates: list[float]) -> float:
        params = {n: theta0[n] - rates[j] * d1[n] for j, g in enumerate(groups)
                  for n in g.params}
        with torch.no_grad():
            return float(ce(functional_call(model, params, (x2,)), y2))

    eps = 1e-6
    n = len(groups)
    if scope == "group":
        fd = []
        for j in range(n):
            up = [1e-2 + (eps if k == j else 0.0) for k in range(n)]
            down = [1e-2 - (eps if k == j else 0.0) for k in range(n)]
            fd.append((loss2(up) - loss2(down)) / (2 * eps))
        dfda = torch.tensor(fd, dtype=torch.float64)
    else:
        fd_all = (loss2([1e-2 + eps] * n) - loss2([1e-2 - eps] * n)) / (2 * eps)
        dfda = torch.full((n,), fd_all, dtype=torch.float64)
    assert dfda.abs().min() > 1e-4, "degenerate test: a rate's derivative is ~0"
    # α_t = α_{t−1} − β·∂f/∂α, compared on the derivative (the FD's error is ~1e-9 of it)
    torch.testing.assert_close((alpha0 - s.alpha) / s.beta, dfda, rtol=1e-6, atol=1e-9)


def test_hd_rates_move_at_the_defaults() -> None:
    """At its default β a 5-epoch run on the synthetic data moves the rates: some group's rate
    changes by ≥ 10 % and the spread (max/min of the final rates) reaches 1.1. At the
    reference's β = 1e-8 (the old default) they changed by ~0.1 %: hd was full fine-tuning."""
    from metalr_bench.benchmark.training.trainer import seed_everything
    from metalr_bench.datasets import load_dataset

    bundle = load_dataset("synthetic", size=16, options={"n_patients": 48})
    seed_everything(0)
    built = build_parts("smallcnn", 1, 2, "hd", {}, TrainSettings(lr=1e-3, epochs=5), bundle=bundle,
                  trainer_settings=TrainerSettings(epochs=5, batch_size=16, seed=0))
    assert built.trainer is not None
    last = built.trainer.fit().history[-1]
    rates = [v for k, v in last.items() if k.startswith("lr/")]
    assert len(rates) == len(built.trainer.groups)
    assert max(abs(r / 1e-3 - 1) for r in rates) >= 0.10
    assert last["lr_spread"] >= 1.1 and last["lr_spread"] == max(rates) / min(rates)
    assert last["hd/max_lr_change"] == pytest.approx(max(abs(r / 1e-3 - 1) for r in rates))


def test_hd_steps_with_the_rate_it_just_updated() -> None:
    """Algorithm 1's order through the real step: backward, rate update, then θ ← θ − α_t·g_t
    with the *new* α_t (plain SGD: the step is visible in the weights)."""
    s, model, _ = _hd("sgd", 0.0, 0.0, 1e-1, lr=1e-2, dtype=torch.float32)
    x, y = batch(torch.float32)
    s.train_step(ctx_for(s, model), (x, y))
    before_rates = s.alpha.clone()
    theta1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    s.train_step(ctx_for(s, model), (x, y))  # same batch: ⟨g2, g1⟩ > 0, every rate rises
    assert (s.alpha > before_rates).all()
    for j, group in enumerate(s.groups):
        for n in group.params:
            p = dict(model.named_parameters())[n]
            torch.testing.assert_close(p.detach(), theta1[n] - s.alpha[j].float() * p.grad)


@pytest.mark.parametrize("kind, momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.9)])
def test_hd_resumes_exactly(kind: str, momentum: float) -> None:
    """strategy + optimizer + model state after step 2 give the same step 3 as no interruption."""
    x, y = batch(torch.float32)
    xs = [x + 0.1 * k for k in range(3)]
    a, model_a, _ = _hd(kind, momentum, 1e-3, 1e-3, dtype=torch.float32)
    for k in range(2):
        a.train_step(ctx_for(a, model_a), (xs[k], y))
    saved = copy.deepcopy({"model": model_a.state_dict(), "opt": a.optimizer.state_dict(),
                           "strategy": a.state_dict()})
    a.train_step(ctx_for(a, model_a), (xs[2], y))

    b, model_b, _ = _hd(kind, momentum, 1e-3, 1e-3, dtype=torch.float32)
    model_b.load_state_dict(saved["model"])
    b.optimizer.load_state_dict(saved["opt"])
    b.load_state_dict(saved["strategy"])
    b.train_step(ctx_for(b, model_b), (xs[2], y))
    assert b.step == a.step == 3
    assert torch.equal(a.alpha, b.alpha) and torch.equal(a.hypergrad, b.hypergrad)
    assert not torch.equal(a.hypergrad, torch.zeros_like(a.hypergrad))
    for (n, pa), pb in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb), n


# -- metalr_public ------------------------------------------------------------------------------
def _meta_pair(public_params: dict | None = None):
    """metalr and metalr_public on identical copies of one model, identical grads."""
    model, groups = tiny()
    x, y = batch(seed=1)
    meta = batch(seed=2)
    model.zero_grad(set_to_none=True)
    ce(model(x), y).backward()
    twin = copy.deepcopy(model)  # weights and BN buffers; deepcopy leaves .grad None
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = p.grad.clone()
    settings = TrainSettings(lr=1e-3, optimizer="adam", weight_decay=1e-4)
    ours = MetaLR({}, model, groups, settings)
    public = MetaLRPublic(public_params or {}, twin, layer_groups(twin), settings)
    for s in (ours, public):
        s.build_optimizer()
    assert torch.equal(ours.alpha, public.alpha)
    return ours, public, model, twin, meta


def test_public_hypergradient_has_the_opposite_sign() -> None:
    ours, public, model, twin, meta = _meta_pair()
    alpha0 = ours.alpha.clone()
    ours.meta_update(ctx_for(ours, model, meta))
    public.meta_update(ctx_for(public, twin, meta))
    h, h_pub = ours.hypergrad, public.hypergrad
    assert (h.abs() > 1e-6).all(), "degenerate test: a group has no hyper-gradient"
    assert torch.equal(torch.sign(h_pub), -torch.sign(h)), (h, h_pub)
    # the rates move the other way
    assert ((public.alpha - alpha0) * (ours.alpha - alpha0) < 0).all()
    # h = ∂L_val(θ + α·g)/∂α exactly (the code's look-ahead), by autograd
    leaf = alpha0.clone().requires_grad_(True)
    named = dict(twin.named_parameters())
    params = {n: named[n].detach() + leaf[j] * named[n].grad
              for j, g in enumerate(public.groups) for n in g.params}
    buffers = {n: b.clone() for n, b in twin.named_buffers()}
    (ref,) = torch.autograd.grad(ce(functional_call(twin, (params, buffers), (meta[0],)),
                                    meta[1]), leaf)
    torch.testing.assert_close(h_pub, ref.to(h_pub.dtype), rtol=1e-5, atol=1e-9)
    # … which is about −metalr's: they differ by the ±α·g between the points the meta gradient
    # is taken at (here up to ~7 %: α = 1e-3 on the head, large gradients of a tiny model)
    assert ((h_pub + h).abs() < 0.2 * h.abs()).all(), (h, h_pub)


def test_public_without_its_defects_is_metalr() -> None:
    ours, public, model, twin, meta = _meta_pair({"ascent": False, "meta_source": "train"})
    assert public.meta_source == "train"
    ours.meta_update(ctx_for(ours, model, meta))
    public.meta_update(ctx_for(public, twin, meta))
    assert torch.equal(ours.hypergrad, public.hypergrad)
    assert torch.equal(ours.alpha, public.alpha)


def test_public_meta_batches_are_always_the_first_training_batch() -> None:
    """Through the real trainer (augmented, shuffled training batches): every meta-step gets
    the first 8 stored training images, un-augmented, and nothing is held out."""
    bundle = random_bundle(16, 64, channels=1)
    built = build_parts("smallcnn", 1, 2, "metalr_public", {}, TrainSettings(), bundle=bundle,
                  trainer_settings=TrainerSettings(epochs=1, batch_size=8))
    trainer = built.trainer
    assert trainer is not None and trainer.strategy.meta_source == "first"
    assert trainer.n_train_images == 64
    seen = []
    inner = trainer._meta_iter

    def spy():
        for b in inner:
            seen.append(b)
            yield b

    trainer._meta_iter = spy()
    result = trainer.fit()
    assert result.meta_source == "first"
    assert len(seen) == 64 // 8  # one meta-step per training step
    first_x = to_float(bundle.train.images[:8])
    first_y = bundle.train.labels[:8]
    for x, y in seen:
        assert torch.equal(x, first_x) and torch.equal(y, first_y)
    train_x, _ = next(iter(trainer.train_loader))
    assert not torch.equal(train_x, first_x)  # the training batches are shuffled/augmented
