"""The linear probe (``strategies/core/probe.py``) shared by ``lp_ft`` and ``linear_probe``: it
reaches the convex optimum (checked against scipy's L-BFGS-B on the same features, written out
by hand), picks λ on validation, and the two strategies use it as their papers say."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from metalr_bench.benchmark.perf.bench_throughput import random_bundle
from metalr_bench.benchmark.training.cell import BuiltCell, build_parts
from metalr_bench.benchmark.training.trainer import TrainerSettings
from metalr_bench.strategies import TrainSettings, get_strategy
from metalr_bench.strategies.core.probe import L2_GRID, fit_probe
from scipy.optimize import minimize
from scipy.special import logsumexp
from torch import nn


def _cell(strategy: str, params: dict[str, Any], *, n_classes: int = 2, epochs: int = 1,
          lr: float = 1e-2) -> BuiltCell:
    torch.manual_seed(0)
    bundle = random_bundle(16, 96, channels=1, n_classes=n_classes, n_val=48)
    built = build_parts("smallcnn", 1, bundle.num_outputs, strategy, params,
                  TrainSettings(lr=lr, epochs=epochs), bundle=bundle,
                  trainer_settings=TrainerSettings(epochs=epochs, batch_size=16, augment=False,
                                                   evaluate_test=False))
    assert built.trainer is not None
    return built


def _features(model: nn.Module, loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """The head's input of every batch, model in eval mode, by a hook of our own."""
    kept: list[torch.Tensor] = []
    handle = model.head.register_forward_hook(lambda m, a, o: kept.append(a[0].detach()))
    model.eval()
    labels = []
    try:
        with torch.no_grad():
            for x, y in loader:
                model(x)
                labels.append(y)
    finally:
        handle.remove()
    return torch.cat(kept).double().numpy(), torch.cat(labels).numpy()


def _scipy_probe(x: np.ndarray, y: np.ndarray, k: int, lam: float
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """argmin mean softmax-CE(x̃Wᵀ + b, y) + λ/2‖W‖², x̃ the standardised features (as the
    probe documents), scipy L-BFGS-B with the gradient by hand; returns W, b mapped back to the
    raw features and the mean cross-entropy (without the L2 term) at the optimum."""
    raw = x
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0)
    x = (x - mean) / std
    n, d = x.shape
    onehot = np.eye(k)[y]

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:k * d].reshape(k, d), theta[k * d:]
        z = x @ w.T + b
        lse = logsumexp(z, axis=1)
        loss = float(np.mean(lse - z[np.arange(n), y])) + 0.5 * lam * float((w ** 2).sum())
        p = np.exp(z - lse[:, None])
        g = (p - onehot) / n
        return loss, np.concatenate([(g.T @ x + lam * w).ravel(), g.sum(0)])

    res = minimize(f, np.zeros(k * d + k), jac=True, method="L-BFGS-B",
                   options={"maxiter": 20000, "gtol": 1e-12, "ftol": 1e-15, "maxcor": 30})
    w, b = res.x[:k * d].reshape(k, d) / std, res.x[k * d:]
    b = b - w @ mean
    z = raw @ w.T + b
    return w, b, float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


@pytest.mark.parametrize("n_classes, lam", [(2, 1e-2), (3, 1e-3)])
def test_probe_reaches_the_convex_optimum(n_classes: int, lam: float) -> None:
    built = _cell("lp_ft", {}, n_classes=n_classes)
    trainer = built.trainer
    assert trainer is not None
    xtr, ytr = _features(built.model, trainer._bn_loader)
    xva, yva = _features(built.model, trainer._eval_loaders["val"])
    fit = fit_probe((torch.from_numpy(xtr), torch.from_numpy(ytr)),
                    (torch.from_numpy(xva), torch.from_numpy(yva)), n_classes, lam)
    w, b, loss = _scipy_probe(xtr, ytr, n_classes, lam)
    assert fit.l2 == lam
    assert fit.train_loss == pytest.approx(loss, rel=0.05)
    assert fit.train_loss == pytest.approx(loss, rel=1e-3)  # in fact much closer
    np.testing.assert_allclose(fit.weight.numpy(), w, atol=2e-3 * np.abs(w).max())
    np.testing.assert_allclose(fit.bias.numpy(), b, atol=2e-3 * max(np.abs(b).max(), 1e-3))


def test_probe_picks_l2_on_validation_loss() -> None:
    built = _cell("lp_ft", {})
    trainer = built.trainer
    assert trainer is not None
    tr = [torch.from_numpy(a) for a in _features(built.model, trainer._bn_loader)]
    va = [torch.from_numpy(a) for a in _features(built.model, trainer._eval_loaders["val"])]
    grid = (1e-1, 1e-2, 1e-3, 1e-4)
    assert set(grid) <= set(L2_GRID)
    chosen = fit_probe((tr[0], tr[1]), (va[0], va[1]), 2, grid=grid)
    val_losses = {lam: fit_probe((tr[0], tr[1]), (va[0], va[1]), 2, lam).val_loss
                  for lam in grid}
    best = min(val_losses, key=val_losses.__getitem__)
    assert chosen.l2 == best
    assert chosen.val_loss == pytest.approx(val_losses[best], rel=1e-3)


def test_lp_ft_starts_fine_tuning_from_the_converged_probe() -> None:
    """LP-FT: before the first epoch the head is the convex optimum on the frozen features of the
    pre-trained network (its logged training loss within 5 % of scipy's at the same λ); then
    every layer trains. (The old LP-FT ran head-only Adam epochs: no probe loss was logged and
    its head stopped far from the optimum.)"""
    built = _cell("lp_ft", {"probe_l2": 1e-2}, epochs=2)
    trainer = built.trainer
    assert trainer is not None and built.strategy.mechanism == "lp_ft/probe_train_loss"
    start = copy.deepcopy(built.model)
    xtr, ytr = _features(start, trainer._bn_loader)
    history = trainer.fit().history
    logged = history[0]
    lam = logged["lp_ft/probe_l2"]
    assert lam == 1e-2
    _, _, loss = _scipy_probe(xtr, ytr, 2, lam)
    assert logged["lp_ft/probe_train_loss"] == pytest.approx(loss, rel=0.05)
    assert logged["lp_ft/probe_val_loss"] > 0
    assert history[1]["lp_ft/probe_train_loss"] == logged["lp_ft/probe_train_loss"]
    # every layer fine-tuned, from every epoch on
    for name, p in built.model.named_parameters():
        assert not torch.equal(p, dict(start.named_parameters())[name]), name


def test_lp_ft_rejects_the_removed_probe_epochs() -> None:
    with pytest.raises(ValueError, match="probe_epochs was removed"):
        get_strategy("lp_ft").Params(probe_epochs=1)


def test_linear_probe_trains_only_the_head_to_the_probe_solution() -> None:
    """After a run: every backbone weight and BatchNorm statistic is bit-identical to the start,
    and the head is the probe's solution (= scipy's optimum at the same λ)."""
    built = _cell("linear_probe", {"probe_l2": 1e-3}, epochs=2)
    trainer, strategy = built.trainer, built.strategy
    assert trainer is not None
    start = {k: v.detach().clone() for k, v in built.model.state_dict().items()}
    xtr, ytr = _features(copy.deepcopy(built.model), trainer._bn_loader)
    result = trainer.fit()
    end = built.model.state_dict()
    backbone = [k for k in start if not k.startswith("head.")]
    assert any(k.endswith("running_mean") for k in backbone)
    for k in backbone:
        assert torch.equal(start[k], end[k]), k
    fit = strategy.probe
    assert fit is not None
    assert torch.equal(end["head.weight"], fit.weight.float())
    assert torch.equal(end["head.bias"], fit.bias.float())
    w, b, loss = _scipy_probe(xtr, ytr, 2, fit.l2)
    np.testing.assert_allclose(end["head.weight"].double().numpy(), w,
                               atol=2e-3 * np.abs(w).max())
    assert result.history[-1]["linear_probe/probe_train_loss"] == pytest.approx(loss, rel=0.05)
    assert strategy.mechanism == "linear_probe/probe_train_loss"


def test_wise_ft_starts_from_the_converged_probe_and_interpolates_towards_it() -> None:
    """WiSE-FT's θ₀ is the pre-trained backbone with the converged linear probe as its head (the
    paper's zero-shot head, here the probe): fine-tuning starts from it, and θ(α = 0) is it. The
    first version kept the cell's random head in θ₀ (this test failed: its head was not the
    probe's solution)."""
    built = _cell("wise_ft", {"probe_l2": 1e-2, "alpha": 0.0}, epochs=1)
    trainer, strategy = built.trainer, built.strategy
    assert trainer is not None
    start = {k: v.detach().clone() for k, v in built.model.state_dict().items()}
    xtr, ytr = _features(copy.deepcopy(built.model), trainer._bn_loader)
    result = trainer.fit()
    _, _, loss = _scipy_probe(xtr, ytr, 2, 1e-2)
    assert result.history[0]["wise_ft/probe_train_loss"] == pytest.approx(loss, rel=0.05)
    head = strategy._head
    # θ₀: the start everywhere but the head, which is the probe's solution
    for k, v in strategy.theta0.items():
        if not k.startswith(head + "."):
            assert torch.equal(v, start[k]), k
    probe = strategy.probe
    assert probe is not None
    assert torch.equal(strategy.theta0[f"{head}.weight"], probe.weight.to(start[f"{head}.weight"]))
    assert not torch.equal(strategy.theta0[f"{head}.weight"], start[f"{head}.weight"])
    # α = 0 tests θ₀ itself: the final weights are θ₀ (floating entries)
    final = result.final_state
    for k, v in strategy.theta0.items():
        if v.is_floating_point() and "running" not in k:
            assert torch.equal(final[k].cpu(), v.cpu()), k
