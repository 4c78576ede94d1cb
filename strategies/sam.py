"""SAM (Foret, Kleiner, Mobahi & Neyshabur, ICLR 2021, "Sharpness-Aware Minimization for
Efficiently Improving Generalization"), with ASAM (Kwon, Kim, Park & Choi, ICML 2021) as an
option: minimise the loss in a neighbourhood of the weights, not only at them.

Each step, around the suite's base optimizer: g = ∇L(w); the worst-case perturbation of norm ρ

       SAM:   ε = ρ · g / ‖g‖                    (‖·‖ the global 2-norm over every trained tensor)
       ASAM:  ε = ρ · T²g / ‖T g‖,   T = |w| + η  (element-wise; T = 1 for biases)

then g_SAM = ∇L(w + ε) on the same batch, the weights restored to w bit for bit, and the base
optimizer steps from w with g_SAM. Two forward/backward passes per step; the second does not
update BatchNorm's running statistics. Logged per epoch: ``sam/sharpness`` (the ``mechanism``)
and ``sam/grad_norm``.

Defaults: ρ = 0.05 (SAM), ρ = 0.5 and η = 0.01 (ASAM); tuned ρ: 0.01..0.5 (SAM), 0.1..2 (ASAM),
log-uniform.

Deviations (ε from the whole batch, ASAM's T as the reference code, + 1e-12 in the norm) and the
BatchNorm handling: docs/strategies.md, section ``sam``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from metalr_bench.strategies.core.base import SpaceError, StepContext, Strategy, register
from metalr_bench.strategies.core.space import LR, SearchDim
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

#: the references' default neighbourhood radius per variant
DEFAULT_RHO = {False: 0.05, True: 0.5}
#: the tuned range of ρ per variant (log-uniform); the declared space spans both
RHO_RANGE = {False: (0.01, 0.5), True: (0.1, 2.0)}
_NORM_EPS = 1e-12


class SAMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rho: float | None = Field(
        None, gt=0, description="ρ, the radius of the neighbourhood; default 0.05 (SAM) or 0.5 "
        "(ASAM), the references'",
    )
    adaptive: bool = Field(False, description="ASAM (Kwon et al. 2021): ε = ρ·T²g/‖Tg‖, "
                           "T = |w| + η")
    eta: float = Field(0.01, ge=0, description="ASAM's η in T = |w| + η (the reference's "
                       "0.01; 0: T = |w|); unused by SAM")


@contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode normalise with batch statistics but leave their running
    statistics and batch counter as they are (``track_running_stats`` off for the block)."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def perturbation(params: list[torch.Tensor], grads: list[torch.Tensor], rho: float, *,
                 adaptive: bool = False, eta: float = 0.0,
                 scaled: list[bool] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """ε per tensor and the norm it was scaled by: SAM ρ·g/‖g‖, or ASAM ρ·T²g/‖Tg‖ with
    T = |w| + η on the tensors ``scaled`` marks (default: all) and T = 1 elsewhere. Norms over
    all tensors together; no host sync."""
    if adaptive:
        scaled = scaled if scaled is not None else [True] * len(params)
        t = [p.detach().abs() + eta if s else None for p, s in zip(params, scaled, strict=True)]
        tg = [g if ti is None else ti * g for g, ti in zip(grads, t, strict=True)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in tg]))
        scale = rho / (norm + _NORM_EPS)
        eps = [x * scale if ti is None else ti * x * scale for x, ti in zip(tg, t, strict=True)]
        return eps, norm
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / (norm + _NORM_EPS)
    return [g * scale for g in grads], norm


@register
class SAM(Strategy):
    """SAM (Foret et al., ICLR 2021; ASAM with adaptive: true): the update uses the gradient at
    w + ρ·g/‖g‖; two forward/backward passes per step (about 2× full fine-tuning's step)."""

    name = "sam"
    description = ("SAM (Foret et al., ICLR 2021; adaptive: ASAM, Kwon et al. 2021): the step uses "
                   "the gradient at w + ρ·g/‖g‖; TWO forward/backward passes per step (~2× full)")
    Params = SAMParams
    test_params = [{}, {"adaptive": True, "rho": 0.5}]
    search_space = {"lr": LR, "rho": SearchDim("float", 0.01, 2.0, log=True)}
    mechanism = "sam/sharpness"

    @classmethod
    def measured_cost_share(cls, params: BaseModel, batch_size: int) -> float:
        """1.0: the throughput benchmark's SAM row (``bench_throughput --strategies sam``)
        already holds both forward/backward passes, and neither ρ nor the variant changes the
        cost (ASAM's T adds element-wise work only). Priced from its own measured row, a SAM
        cell costs about twice ``full``'s step."""
        return 1.0

    @classmethod
    def constrain_space(cls, space: dict[str, SearchDim], fixed: dict[str, Any]
                        ) -> dict[str, SearchDim]:
        """ρ is searched over the variant's range: 0.01 .. 0.5 for SAM, 0.1 .. 2 for ASAM."""
        dim = space.get("rho")
        if dim is None:
            return space
        lo, hi = RHO_RANGE[bool(fixed.get("adaptive", False))]
        low, high = max(float(dim.low), lo), min(float(dim.high), hi)
        if not low < high:
            raise SpaceError("rho", f"ρ's range [{dim.low:g}, {dim.high:g}] misses the "
                             f"variant's [{lo:g}, {hi:g}]")
        return space | {"rho": SearchDim(dim.type, low, high, dim.log)}

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        p: SAMParams = self.params
        self.rho = DEFAULT_RHO[p.adaptive] if p.rho is None else p.rho
        self._names = {param: name for name, param in model.named_parameters()}
        device = next(model.parameters()).device
        #: epoch sums of L(w + ε) − L(w) and of ‖g‖ (or ‖Tg‖), and the steps counted
        self._sharpness = torch.zeros((), device=device)
        self._grad_norm = torch.zeros((), device=device)
        self._steps = 0

    def on_epoch_start(self, epoch: int) -> None:
        self._sharpness.zero_()
        self._grad_norm.zero_()
        self._steps = 0

    def train_step(self, ctx: StepContext, batch: tuple[torch.Tensor, torch.Tensor]
                   ) -> torch.Tensor:
        x, y = batch
        loss = self.forward_backward(ctx, batch)  # g = ∇L(w) in .grad
        params = [p for group in ctx.optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        p: SAMParams = self.params
        with torch.no_grad():
            eps, norm = perturbation(
                params, [q.grad for q in params], self.rho, adaptive=p.adaptive, eta=p.eta,
                scaled=[self._names.get(q, "").rpartition(".")[2] == "weight" for q in params])
            saved = [q.detach().clone() for q in params]  # w, restored exactly below
            torch._foreach_add_(params, eps)  # w + ε
        ctx.optimizer.zero_grad(set_to_none=True)
        forward = ctx.model if ctx.forward is None else ctx.forward
        with running_stats_frozen(ctx.model), ctx.autocast():
            perturbed = ctx.loss_fn(forward(x), y)
        perturbed.backward()  # g_SAM = ∇L(w + ε)
        with torch.no_grad():
            for q, w in zip(params, saved, strict=True):  # back to w (bit for bit)
                q.copy_(w)
        ctx.optimizer.step()
        self._sharpness += (perturbed.detach() - loss.detach()).float()
        self._grad_norm += norm.float()
        self._steps += 1
        return loss.detach()

    def log_values(self) -> dict[str, float]:
        out = super().log_values()
        if self._steps:
            out |= {"sam/sharpness": float(self._sharpness) / self._steps,
                    "sam/grad_norm": float(self._grad_norm) / self._steps}
        return out
