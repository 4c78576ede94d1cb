"""The linear probe, one implementation for every strategy that needs it (``linear_probe``,
LP-FT's first phase, later WiSE-FT): the new head fitted to convergence on the frozen
pre-trained features.

What the reference does (Kumar et al., ICLR 2022, ``AnanyaKumar/transfer_learning``,
its logistic-regression probe): extract the features of the frozen network once (eval mode), fit an
L2-regularised logistic regression with scikit-learn, and pick its inverse regularisation C on
in-distribution validation data. Here:

* features: the input of the head's ``nn.Linear``, computed once for the un-augmented training
  and validation images with the whole network in eval mode (BatchNorm on its pre-trained
  running statistics, no dropout), as the reference;
* the fit: full-batch L-BFGS (strong Wolfe line search, float64) on the task's own loss,
  softmax cross-entropy (single-label) or binary cross-entropy per label (multi-label), mean over
  the images, + λ/2·‖W‖² (the bias is not penalised, as scikit-learn's), on features
  standardised with the training features' mean and scale (:func:`fit_probe` says why; the
  fitted head works on the raw features). The problem is convex, so L-BFGS reaches
  scikit-learn's solution on the standardised features; in scikit-learn's terms λ = 1/(C·N);
* λ: fixed by the strategy's ``probe_l2``, or (``None``, the default) the one of
  :data:`L2_GRID` whose probe has the lowest validation loss, as the reference's sweep of C on
  validation data (its criterion is validation accuracy; the loss is smoother on a few hundred
  images and never ties). The fits run from the largest λ down, each warm-started from the last.
  Only the validation split is used, never the test split.

The fitted head replaces the model's new head in place (:func:`probe_head`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from metalr_bench.strategies.core.layers import LayerGroup
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

#: the λ swept on validation when the strategy fixes none (high to low, half-decade steps)
L2_GRID: tuple[float, ...] = tuple(10.0 ** (-e / 2) for e in range(2, 13))  # 1e-1 .. 1e-6
#: L-BFGS iterations per λ (each a full-batch pass; the warm start needs far fewer)
MAX_ITER = 500


class ProbeParams(BaseModel):
    """The probe's one knob, shared by ``lp_ft`` and ``linear_probe``."""

    model_config = ConfigDict(extra="forbid")
    probe_l2: float | None = Field(
        None, gt=0, description="λ of the probe's λ/2·‖W‖²; null: the value of a grid "
        "(1e-1 .. 1e-6) with the lowest validation loss",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_probe_epochs(cls, data: Any) -> Any:
        if isinstance(data, dict) and "probe_epochs" in data:
            raise ValueError("probe_epochs was removed: the probe is now fitted to convergence "
                             "on frozen features before the first epoch (no epoch of the run "
                             "is spent on it); drop probe_epochs, or set probe_l2")
        return data


@dataclass
class ProbeFit:
    """A fitted probe: the head's weight (outputs × features) and bias, its λ, and its mean
    task losses (without the L2 term) on the training and validation features."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    train_loss: float
    val_loss: float

    def log_values(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/probe_train_loss": self.train_loss,
                f"{prefix}/probe_val_loss": self.val_loss, f"{prefix}/probe_l2": self.l2}

    def state_dict(self) -> dict[str, Any]:
        return {"l2": self.l2, "train_loss": self.train_loss, "val_loss": self.val_loss,
                "weight": self.weight.detach().cpu(), "bias": self.bias.detach().cpu()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ProbeFit:
        return cls(state["weight"], state["bias"], state["l2"], state["train_loss"],
                   state["val_loss"])


def head_linear(model: nn.Module, groups: list[LayerGroup]) -> nn.Linear:
    """The one ``nn.Linear`` of the head (the last layer group), the layer the probe fits."""
    head = groups[-1]
    linears = [m for path in head.modules for m in model.get_submodule(path).modules()
               if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise ValueError(f"the linear probe needs a head with exactly one nn.Linear; the last "
                         f"layer group {head.name!r} ({list(head.modules)}) has {len(linears)}")
    return linears[0]


@torch.no_grad()
def frozen_features(model: nn.Module, linear: nn.Linear,
                    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every batch of ``loader``: the input of ``linear`` with the model in
    eval mode (each module's train/eval mode is restored afterwards), features in float64."""
    kept: list[torch.Tensor] = []
    handle = linear.register_forward_hook(lambda m, args, out: kept.append(args[0].detach()))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    labels = []
    try:
        for x, y in loader:
            with autocast():
                model(x)
            labels.append(y)
    finally:
        handle.remove()
        for m, mode in modes:
            m.train(mode)
    if not labels:
        raise ValueError("the linear probe got no images (an empty split)")
    return torch.cat(kept).flatten(1).double(), torch.cat(labels)


def probe_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task's loss, as the trainer's: cross-entropy for class indices, binary cross-entropy
    per label for multi-label targets (same shape as the logits)."""
    if y.shape == logits.shape:
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
    return F.cross_entropy(logits, y.long())


def fit_linear(features: torch.Tensor, y: torch.Tensor, n_outputs: int, l2: float,
               init: tuple[torch.Tensor, torch.Tensor] | None = None,
               max_iter: int = MAX_ITER) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_{W,b} mean loss(features·Wᵀ + b, y) + λ/2·‖W‖², by full-batch L-BFGS in float64."""
    x = features.double()
    d = x.shape[1]
    if init is None:
        w = torch.zeros(n_outputs, d, dtype=torch.float64, device=x.device)
        b = torch.zeros(n_outputs, dtype=torch.float64, device=x.device)
    else:
        w, b = (t.detach().double().clone() for t in init)
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = probe_loss(x @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def standardise(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scale of each training feature (scale 1 where a feature is constant)."""
    mean = features.mean(0)
    std = features.std(0, correction=0)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def fit_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
              n_outputs: int, l2: float | None = None,
              grid: tuple[float, ...] = L2_GRID) -> ProbeFit:
    """The probe on (training features, labels), λ = ``l2`` or the value of ``grid`` (high to
    low) with the lowest loss on the validation features.

    The features are standardised with the training features' mean and scale before the fit
    (λ penalises the weights of the standardised features), and the solution is mapped back to
    the raw features (W/σ, b − (W/σ)·μ: the same logits). Why: a network's features can be tiny
    or huge (a random SmallCNN's are ≈ 0.02), so one λ grid would mean something else for every
    network, and L-BFGS converges slowly on badly scaled features."""
    mean, scale = standardise(train[0])
    x_train = (train[0] - mean) / scale
    grid = grid if l2 is None else (l2,)
    best: ProbeFit | None = None
    init = None
    for lam in grid:
        w_std, b_std = fit_linear(x_train, train[1], n_outputs, lam, init=init)
        init = (w_std, b_std)
        w = w_std / scale
        b = b_std - w @ mean
        with torch.no_grad():
            val_loss = float(probe_loss(val[0] @ w.T + b, val[1]))
            train_loss = float(probe_loss(train[0] @ w.T + b, train[1]))
        if not math.isfinite(train_loss):
            continue
        if best is None or val_loss < best.val_loss:
            best = ProbeFit(w, b, lam, train_loss, val_loss)
    if best is None:
        raise RuntimeError("the linear probe diverged for every λ (non-finite features?)")
    return best


def probe_head(model: nn.Module, groups: list[LayerGroup],
               train: Iterable[tuple[torch.Tensor, torch.Tensor]],
               val: Iterable[tuple[torch.Tensor, torch.Tensor]],
               autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
               l2: float | None = None) -> ProbeFit:
    """Fit the probe on the frozen features of ``train`` (λ chosen on ``val`` unless given) and
    write it into the model's head ``nn.Linear``; returns the fit."""
    linear = head_linear(model, groups)
    if linear.bias is None:
        raise ValueError("the linear probe fits a head with a bias; this head's nn.Linear "
                         "has none")
    fit = fit_probe(frozen_features(model, linear, train, autocast),
                    frozen_features(model, linear, val, autocast), linear.out_features, l2)
    with torch.no_grad():
        linear.weight.copy_(fit.weight.to(linear.weight.dtype))
        linear.bias.copy_(fit.bias.to(linear.bias.dtype))
    return fit


class ProbeOwner:
    """The probe's bookkeeping for a strategy that fits it (``lp_ft``, ``linear_probe``,
    ``wise_ft``): its losses and λ logged every epoch under the strategy's name, and the fit kept
    in the strategy's state for an exact resume (``before_fit`` runs on a fresh run only). Put it
    before :class:`Strategy` in the bases: it extends the base's methods through ``super()``."""

    name: str
    probe: ProbeFit | None = None

    def __init__(self, params: Any, model: nn.Module, groups: list[LayerGroup],
                 settings: Any) -> None:
        super().__init__(params, model, groups, settings)
        #: the head's ``nn.Linear`` the probe fits; checked here, at start-up, not after the
        #: first epoch's data
        self.probe_linear = head_linear(model, groups)
        #: the fitted probe (None until ``before_fit``)
        self.probe = None

    def before_fit(self, data: Any) -> None:
        """Fit the probe on the trainer's un-augmented train/val loaders (``FitData``), λ from
        ``params.probe_l2`` (None: chosen on validation), and write it into the head."""
        with self.one_off("probe_fit"):
            self.probe = probe_head(self.model, self.groups, data.train, data.val,
                                    data.autocast, self.params.probe_l2)

    def log_values(self) -> dict[str, float]:
        probe = {} if self.probe is None else self.probe.log_values(self.name)
        return super().log_values() | probe

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "probe": None if self.probe is None else self.probe.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        probe = state.get("probe")
        self.probe = None if probe is None else ProbeFit.from_state(probe)
