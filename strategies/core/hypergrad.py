"""The exact hyper-gradient of a one-step SGD look-ahead w.r.t. per-group learning rates.

MetaLR (Chen et al., MICCAI 2023, eq. 1-2) looks one step ahead with the current layer-wise
rates, θ̂_j = θ_j − α_j · g_j with g = ∇_θ L_train(θ), and moves α_j along −∂L_val(θ̂)/∂α_j.
Because g does not depend on α, the chain rule gives the derivative exactly:

    ∂L_val(θ̂)/∂α_j = ⟨∇_{θ̂_j} L_val(θ̂), ∂θ̂_j/∂α_j⟩ = −⟨∇_{θ̂_j} L_val(θ̂), g_j⟩

so one extra forward/backward on the validation batch suffices: no second-order graph, no
model copy, no state-dict reload (the public code rebuilds a ResNet and reloads its state dict
every iteration, and its look-ahead computes θ + α·g, i.e. gradient *ascent*).

The look-ahead runs through :func:`torch.func.functional_call` with the look-ahead parameters
and *scratch copies* of the buffers, so BatchNorm's running statistics and the parameters of the
real model are left untouched. The scratch buffers are allocated once and refreshed with one
fused ``_foreach_copy_`` per meta-step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from metalr_bench.strategies.core.layers import LayerGroup
from torch import nn
from torch.func import functional_call

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Lookahead:
    """Per-model bookkeeping reused at every meta-step (names, group membership, scratch buffers).

    ``groups`` must cover the model's parameters (they do: :func:`layer_groups`). Parameters whose
    ``.grad`` is None at a meta-step (unused, frozen) are held fixed in the look-ahead and add
    nothing to the hyper-gradient.
    """

    def __init__(self, model: nn.Module, groups: list[LayerGroup]) -> None:
        self.model = model
        named = dict(model.named_parameters())
        self.members: list[list[tuple[str, nn.Parameter]]] = [
            [(n, named[n]) for n in g.params] for g in groups
        ]
        owned = {n for g in groups for n in g.params}
        self.others = [(n, p) for n, p in named.items() if n not in owned]
        self.n_groups = len(groups)
        self._buffer_names: list[str] = []
        self._buffers: list[torch.Tensor] = []
        self._scratch: list[torch.Tensor] = []
        self._ahead: dict[str, torch.Tensor] = {}  # persistent look-ahead leaves θ̂
        self._index_cache: dict[Any, torch.Tensor] = {}
        self.compiled = False
        self.forward: Callable[..., torch.Tensor] = self._functional

    def _functional(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                    x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (params, buffers), (x,), strict=False)

    def use_compile(self, flag: bool) -> None:
        """Run the look-ahead forward through ``torch.compile`` (the trainer's ``compile``
        option). The θ̂ leaves and scratch buffers are the same tensors at every meta-step, so
        the graph is compiled once per meta batch shape, not once per step."""
        if flag != self.compiled:
            self.compiled = flag
            self.forward = (torch.compile(self._functional, dynamic=False) if flag
                            else self._functional)

    def scratch_buffers(self) -> dict[str, torch.Tensor]:
        """Fresh copies of the model's buffers (BN running stats) for the look-ahead forward."""
        live = list(self.model.named_buffers())
        if len(live) != len(self._buffers) or any(
            b is not old for (_, b), old in zip(live, self._buffers, strict=True)
        ):  # first call, or the model was moved / its buffers replaced: (re)allocate
            self._buffer_names = [n for n, _ in live]
            self._buffers = [b for _, b in live]
            self._scratch = [torch.empty_like(b) for b in self._buffers]
        if self._buffers:
            torch._foreach_copy_(self._scratch, self._buffers)
        return dict(zip(self._buffer_names, self._scratch, strict=True))

    @torch.no_grad()
    def params_at(self, alpha: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """θ̂ = θ − α_j·g_j written into persistent leaf tensors (one pass, no allocation).

        Returns the name->tensor map for :func:`functional_call` and the ``(θ̂, g, group)``
        triples that enter the hyper-gradient.
        """
        out: dict[str, torch.Tensor] = {n: p for n, p in self.others}
        triples: list[Any] = []
        neg = (-alpha).unbind()
        for j, members in enumerate(self.members):
            for n, p in members:
                if p.grad is None:
                    out[n] = p.detach()
                    continue
                t = self._ahead.get(n)
                if t is None or t.shape != p.shape or t.device != p.device or (
                    t.dtype != p.dtype or t.stride() != p.stride()
                ):
                    t = self._ahead[n] = torch.empty_like(p).requires_grad_(True)
                torch.addcmul(p, p.grad, neg[j].to(p.dtype), out=t)
                out[n] = t
                triples.append((t, p.grad, j))
        return out, triples


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ in one pass: a BLAS dot over memory order when both share a dense layout
    (contiguous or channels_last), else an elementwise product and sum."""
    dense = a.is_contiguous() or (a.ndim == 4 and a.is_contiguous(memory_format=torch.channels_last))
    if dense and a.stride() == b.stride() and a.dtype == b.dtype:
        n = a.numel()
        return torch.dot(a.as_strided((n,), (1,), a.storage_offset()),
                         b.as_strided((n,), (1,), b.storage_offset()))
    return (a * b).sum()


def hypergradient(
    look: Lookahead,
    alpha: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    loss_fn: LossFn,
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂L_val(θ̂)/∂α, L_val(θ̂))`` for every group, with ``.grad`` already holding g.

    Returns a tensor of shape ``[n_groups]`` on ``alpha``'s device (no host sync) and the detached
    validation loss at the look-ahead point.
    """
    params, triples = look.params_at(alpha)
    buffers = look.scratch_buffers()
    with autocast():
        out = look.forward(params, buffers, x_val)
        loss = loss_fn(out, y_val)
    h = torch.zeros(look.n_groups, dtype=alpha.dtype, device=alpha.device)
    if not triples:
        return h, loss.detach()
    vgrads = torch.autograd.grad(loss, [t for t, _, _ in triples], allow_unused=True)
    dots, index = [], []
    for v, (_, g, j) in zip(vgrads, triples, strict=True):
        if v is not None:
            dots.append(_dot(v, g).to(h.dtype))
            index.append(j)
    if dots:
        key = (tuple(index), h.device)
        idx = look._index_cache.get(key)
        if idx is None:  # built once per pattern: a host->device copy would sync each step
            idx = look._index_cache[key] = torch.tensor(index, device=h.device)
        h.index_add_(0, idx, torch.stack(dots), alpha=-1)
    return h, loss.detach()


def update_rates(
    alpha: torch.Tensor,
    h: torch.Tensor,
    *,
    rule: str,
    hyper_lr: float,
    lr_min: float,
    lr_max: float,
) -> torch.Tensor:
    """MetaLR's LR step (on the device, no sync).

    multiplicative (the public code's rule): α ← clip(α·(1 − η·h), lo, hi): a relative step, so
    rates that differ by orders of magnitude move at comparable speed;
    additive (plain gradient descent on α): α ← clip(α − η·h, lo, hi).
    """
    if rule == "multiplicative":
        new = alpha * (1 - hyper_lr * h)
    elif rule == "additive":
        new = alpha - hyper_lr * h
    else:
        raise ValueError(f"unknown update rule {rule!r}; choose multiplicative or additive")
    return new.clamp(lr_min, lr_max)
