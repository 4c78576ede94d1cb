"""HD: hypergradient descent on one learning rate per layer group.

Reference: A. G. Baydin, R. Cornish, D. Martínez Rubio, M. Schmidt, F. Wood, "Online Learning
Rate Adaptation with Hypergradient Descent", ICLR 2018 (SGD-HD, SGDN-HD, Adam-HD); reference code
gbaydin/hypergradient-descent.

The learning rate is trained by gradient descent through the last step: with d_{t−1} the
direction the optimizer applied at step t−1 (SGD: the gradient or momentum buffer; Adam: its
update m̂/(√v̂ + ε); AdamW: that plus λ·θ_{t−2}),

    h_t = ∂f(θ_{t−1})/∂α = −⟨∇f(θ_{t−1}), d_{t−1}⟩,   α_t = α_{t−1} − β·h_t = α_{t−1} + β·⟨g_t, d_{t−1}⟩

and the step θ_t = θ_{t−1} − α_t·d_t uses the updated rate. ``scope: group`` (default): one α_j
per layer group, h_j summed over the group's parameters; ``scope: global``: the paper's one α.

Defaults: β (``hyper_lr``, :data:`DEFAULT_HYPER_LR`) = 1e-5 with Adam/AdamW, 1e-3 with SGD;
search space 1e-7..1e-3 (log); no bounds on α; the benchmark's optimizer (Adam, weight decay
1e-4). Logged per epoch: ``lr/<group>``, ``lr_spread``, ``hd/max_lr_change``.

Deviations: per group by default, β far above the reference's 1e-8 (which leaves the rates
still on this data), one α_j per group per step, the paper's ε; the reasons, the measurement
behind β and the optimizer details: docs/strategies.md, section ``hd``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from metalr_bench.strategies.core.base import StepContext, Strategy, lr_spread, register
from metalr_bench.strategies.core.hypergrad import _dot
from metalr_bench.strategies.core.optim import OptimizerName, create_optimizer
from metalr_bench.strategies.core.space import LR, SearchDim
from pydantic import BaseModel, ConfigDict, Field

#: the reference optimizers' default ``hypergrad_lr`` (AdamHD, SGDHD): the rates barely move
#: on the benchmark's data with them (module docstring)
REFERENCE_HYPER_LR = {"adam": 1e-8, "adamw": 1e-8, "sgd": 1e-6}
#: β by optimizer, chosen so the rates move on the benchmark's data (module docstring)
DEFAULT_HYPER_LR = {"adam": 1e-5, "adamw": 1e-5, "sgd": 1e-3}


class HDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyper_lr: float | None = Field(
        None, ge=0, description="β, the step of the LR update; default 1e-5 with Adam/AdamW, "
        "1e-3 with SGD, so the rates move on the benchmark's data (the reference's 1e-8/1e-6 "
        "barely move them; 0: the plain optimizer)",
    )
    scope: Literal["group", "global"] = Field(
        "group", description="group: one rate per layer group (layer-wise, as MetaLR); global: "
        "the paper's one rate for every parameter",
    )
    optimizer: OptimizerName | None = Field(
        None, description="real optimizer (Adam-HD / SGD-HD); default: the benchmark's setting"
    )


@register
class HD(Strategy):
    """Hypergradient descent (Baydin et al. 2018): each layer group's LR moves by β·⟨g_t, d_{t−1}⟩."""

    name = "hd"
    Params = HDParams
    test_params = [{}, {"optimizer": "sgd", "hyper_lr": 1e-6, "scope": "global"}]
    search_space = {"lr": LR, "hyper_lr": SearchDim("float", 1e-7, 1e-3, log=True)}
    mechanism = "lr_spread"

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        p: HDParams = self.params
        if p.optimizer is not None:
            self.settings = dataclasses.replace(settings, optimizer=p.optimizer)
        self.kind = self.settings.optimizer.lower()
        if self.kind not in DEFAULT_HYPER_LR:
            raise ValueError(f"unknown optimizer {self.settings.optimizer!r}; "
                             "choose adam, adamw or sgd")
        self.beta = DEFAULT_HYPER_LR[self.kind] if p.hyper_lr is None else p.hyper_lr
        self.group_names = [g.name for g in groups]
        device = next(model.parameters()).device
        #: α_j, float64: the master copy the updates accumulate in
        self.alpha = torch.full((len(groups),), self.settings.lr, dtype=torch.float64,
                                device=device)
        self.hypergrad = torch.zeros(len(groups), dtype=torch.float64, device=device)
        self.step = 0  # optimizer steps taken (hyper_step counts them)
        self._lr = self.alpha.float()  # the optimizer's LR tensors are views of it
        self._views: list[torch.Tensor] = list(self._lr.unbind())
        self._index: list[int] = []
        self._names = {p: n for n, p in model.named_parameters()}
        #: SGD without momentum: the previous direction g_{t−1} (+ λ·θ), by parameter name
        self._prev: dict[str, torch.Tensor] = {}
        self._index_cache: dict[Any, torch.Tensor] = {}

    # -- optimizer with the rates as device tensors ---------------------------------------------
    def build_optimizer(self) -> torch.optim.Optimizer:
        device = next(self.model.parameters()).device
        self.alpha = self.alpha.to(device)
        self.hypergrad = self.hypergrad.to(device)
        self._lr = self.alpha.float()
        self._views = list(self._lr.unbind())
        groups = [self._group(i, lr=self._views[i]) for i in range(len(self.groups))]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError(f"strategy {self.name!r} left no trainable parameter")
        s = self.settings
        # fused kernels take a device-tensor LR without a host sync; on CPU the plain loop reads
        # it as a number (no device to sync with)
        extra: dict[str, Any] = {"fused": True} if device.type == "cuda" else {"foreach": False}
        self.optimizer = create_optimizer(groups, s, self.kind, **extra)
        self._index = [self.group_names.index(g["name"]) for g in self.optimizer.param_groups]
        return self.optimizer

    # -- the hyper-gradient -----------------------------------------------------------------------
    def _previous_directions(self, ps: list[torch.Tensor], opt: torch.optim.Optimizer,
                             group: dict[str, Any], lr: torch.Tensor) -> list[Any]:
        """d_{t−1} for each parameter of ``ps`` (None: no previous step): what its last step
        moved it by, divided by −α; multi-tensor ops where the optimizer has moments."""
        states = [opt.state.get(p) or {} for p in ps]
        if self.kind == "sgd":
            if group["momentum"] == 0:
                return [self._prev.get(self._names[p]) for p in ps]
            return [st.get("momentum_buffer") for st in states]
        have = [i for i, st in enumerate(states) if "exp_avg" in st]
        out: list[Any] = [None] * len(ps)
        if not have or self.step == 0:
            return out  # first step: no previous direction, h = 0
        beta1, beta2 = group["betas"]
        # the bias corrections as PyTorch's Adam forms them, in double precision, from the
        # number of steps taken (every step of this strategy steps every parameter with a
        # gradient; reading the optimizer's ``step`` tensors would sync on fused kernels)
        t = self.step
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        denom = torch._foreach_sqrt([states[i]["exp_avg_sq"] for i in have])
        torch._foreach_div_(denom, bc2 ** 0.5)
        torch._foreach_add_(denom, group["eps"])
        u = torch._foreach_div([states[i]["exp_avg"] for i in have], denom)
        torch._foreach_div_(u, bc1)  # u = m̂/(√v̂ + ε)
        wd = group["weight_decay"]
        if self.kind == "adamw" and wd != 0:
            # θ_{t−1} = θ_{t−2}·(1 − α·λ) − α·u  =>  d = u + λ·θ_{t−2}, with
            # θ_{t−2} = (θ_{t−1} + α·u)/(1 − α·λ)  (α a device tensor: no host read)
            theta = torch._foreach_mul(u, lr.to(u[0].dtype))
            torch._foreach_add_(theta, [ps[i] for i in have])
            torch._foreach_div_(theta, (1 - lr * wd).to(u[0].dtype))
            torch._foreach_add_(u, theta, alpha=wd)
        for i, d in zip(have, u, strict=True):
            out[i] = d
        return out

    @torch.no_grad()
    def hyper_step(self, opt: torch.optim.Optimizer) -> torch.Tensor:
        """h_j = −Σ_{p∈j} ⟨g_t,p, d_{t−1},p⟩ from ``.grad`` and the optimizer's state, then
        α_j ← α_j − β·h_j. Call after backward and before each ``opt.step()`` (it counts the
        steps); returns h, on the device, without a host sync."""
        dots: list[torch.Tensor] = []
        index: list[int] = []
        keep: dict[str, torch.Tensor] = {}
        for group, j in zip(opt.param_groups, self._index, strict=True):
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            wd = group["weight_decay"]
            gs = [p.grad for p in ps]
            if wd != 0 and self.kind != "adamw":  # coupled decay: g = ∇L + λ·θ, the gradient of f
                gs = torch._foreach_add(gs, ps, alpha=wd)
            ds = self._previous_directions(ps, opt, group, self._views[j])
            for g, d in zip(gs, ds, strict=True):
                if d is not None:
                    dots.append(_dot(g, d).to(torch.float64))
                    index.append(j)
            if self.kind == "sgd" and group["momentum"] == 0:  # d_t = g_t, for step t + 1
                fresh = wd != 0  # the coupled-decay sums are new tensors already
                keep |= {self._names[p]: g if fresh else g.clone()
                         for p, g in zip(ps, gs, strict=True)}
        if self.kind == "sgd":
            self._prev = keep
        h = torch.zeros_like(self.hypergrad)  # h_j, group j's share of the global h
        if dots:
            key = (tuple(index), h.device)
            idx = self._index_cache.get(key)
            if idx is None:  # built once per pattern: a host->device copy would sync each step
                idx = self._index_cache[key] = torch.tensor(index, device=h.device)
            h.index_add_(0, idx, torch.stack(dots), alpha=-1)
        if self.params.scope == "global":  # one α: every group moves by β·Σ_j h_j
            # computed once and broadcast: a vectorised subtraction may round lanes differently
            self.alpha.copy_((self.alpha[0] - self.beta * h.sum()).expand_as(self.alpha))
        else:
            self.alpha.sub_(h, alpha=self.beta)
        self._lr.copy_(self.alpha)  # in place: the optimizer's LR tensors are views
        self.hypergrad.copy_(h)
        self.step += 1
        return h

    def train_step(
        self, ctx: StepContext, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        opt = ctx.optimizer
        loss = self.forward_backward(ctx, batch)
        for g, i in zip(opt.param_groups, self._index, strict=True):
            g["lr"] = self._views[i]  # re-bind after an optimizer load_state_dict, cheap
        self.hyper_step(opt)  # α_t from g_t and d_{t−1}, then the step with α_t
        opt.step()
        return loss.detach()

    # -- reporting and resume ---------------------------------------------------------------------
    def log_values(self) -> dict[str, float]:
        """Every group's current LR, their spread, the largest relative change from the
        starting lr and the last hyper-gradient (one host sync)."""
        a = self.alpha.detach().cpu().tolist()
        h = self.hypergrad.detach().cpu().tolist()
        out = {f"lr/{n}": v for n, v in zip(self.group_names, a, strict=True)}
        out |= lr_spread(a)
        out["hd/max_lr_change"] = max(abs(v / self.settings.lr - 1) for v in a)
        return out | {f"hypergrad/{n}": v for n, v in zip(self.group_names, h, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """The rates, the last h and, for SGD without momentum, g_{t−1}; Adam's moments and
        SGD's momentum buffers are in the optimizer's state, which the trainer saves."""
        return {
            "alpha": self.alpha.detach().cpu().clone(),
            "hypergrad": self.hypergrad.detach().cpu().clone(),
            "step": self.step,
            "prev": {n: t.detach().cpu().clone() for n, t in self._prev.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.alpha.copy_(state["alpha"])
            self.hypergrad.copy_(state["hypergrad"])
            self._lr.copy_(self.alpha)
        self.step = int(state["step"])
        named = dict(self.model.named_parameters())
        self._prev = {n: t.to(named[n].device, named[n].dtype)
                      for n, t in state.get("prev", {}).items()}
