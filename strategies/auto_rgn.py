"""Auto-RGN (Lee, Chen, Tajwar, Kumar, Yao, Liang & Finn, ICLR 2023, "Surgical Fine-Tuning
Improves Adaptation to Distribution Shifts", section 5): each layer's learning rate follows its
relative gradient norm, a soft way of choosing which layers to tune.

At the start of every epoch, with the weights as they are:

    RGN_g = mean over rgn_batches training batches of ||∇_{θ_g} L|| / ||θ_g||
    lr_g  = lr · RGN_g / max_j RGN_j

per layer group g (:mod:`metalr_bench.strategies.core.layers`); the rates hold for the epoch.
The RGN batches are fresh, un-augmented training batches (``meta_source = "train"``); the
gradients are taken with ``torch.autograd.grad`` in train mode and BatchNorm statistics are put
back afterwards. Logged: ``lr/<group>`` and ``rgn/<group>``.

Defaults: ``rgn_batches`` as in the reference (5), the benchmark's optimizer, kept across epochs.

Deviations (one LR per layer group, normalisation layers found by type and trained, the
optimizer's state kept, un-augmented batches, guards against zero norms): docs/strategies.md,
section ``auto_rgn``.
"""

from __future__ import annotations

from typing import Any

import torch
from metalr_bench.strategies.core.base import StepContext, Strategy, register
from metalr_bench.strategies.core.space import LR
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

#: the floor of a weight norm and of the largest RGN (keeps the rates finite)
_TINY = 1e-12
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class AutoRGNParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rgn_batches: int = Field(
        5, ge=1, description="training batches the RGN is averaged over at the start of each "
        "epoch (the reference: 5); each costs one extra forward/backward",
    )


def rgn_parameters(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """The parameters of ``names`` that count in the RGN: all but normalisation layers'."""
    def owner(name: str) -> nn.Module:
        return model.get_submodule(name.rpartition(".")[0]) if "." in name else model

    kept = [n for n in names if not isinstance(owner(n), _NORM_LAYERS)]
    return kept or list(names)


@register
class AutoRGN(Strategy):
    """Auto-RGN: each layer group's LR = lr · RGN / max RGN (‖grad‖/‖weights‖), set each epoch."""

    name = "auto_rgn"
    Params = AutoRGNParams
    test_params = [{"rgn_batches": 2}]
    search_space = {"lr": LR}
    meta_source = "train"
    mechanism = "lr_spread"

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        named = dict(model.named_parameters())
        self.group_names = [g.name for g in groups]
        #: per layer group, the parameters whose norms make its RGN
        self.rgn_params = [[named[n] for n in rgn_parameters(model, g.params)] for g in groups]
        device = next(model.parameters()).device
        #: the last measured RGN per group (NaN until the first epoch starts)
        self.rgn = torch.full((len(groups),), float("nan"), device=device)
        self.epoch = -1  # the epoch whose rates are set

    def train_step(
        self, ctx: StepContext, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor | None:
        if ctx.epoch != self.epoch:
            self.update_rates(ctx)
            self.epoch = ctx.epoch
        return None  # the trainer's own step, with the epoch's rates

    def measure(self, ctx: StepContext) -> torch.Tensor:
        """RGN per group at the current weights, averaged over ``rgn_batches`` batches of
        ``ctx.meta_batch``; leaves the weights, their ``.grad`` and the buffers as they were."""
        if ctx.meta_batch is None:
            raise RuntimeError(
                "auto_rgn needs training batches for its RGN: run it through the Trainer "
                "(which reads strategy.meta_source) or pass StepContext.meta_batch"
            )
        model = ctx.model
        forward = model if ctx.forward is None else ctx.forward
        flat = [p for ps in self.rgn_params for p in ps]
        sizes = [len(ps) for ps in self.rgn_params]
        saved = [b.detach().clone() for b in model.buffers()]
        total = torch.zeros_like(self.rgn)
        for _ in range(self.params.rgn_batches):
            x, y = ctx.meta_batch()
            with ctx.autocast():
                loss = ctx.loss_fn(forward(x), y)
            grads = torch.autograd.grad(loss, flat)
            total += _group_norms(grads, sizes)
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved, strict=True):
                b.copy_(s)
            weights = _group_norms([p.detach() for p in flat], sizes)
        return (total / self.params.rgn_batches) / weights.clamp_min(_TINY)

    def update_rates(self, ctx: StepContext) -> None:
        """Measure the RGN and set every optimizer group's LR to lr · RGN_g / max RGN."""
        rgn = self.measure(ctx)
        self.rgn.copy_(rgn)
        rates = self.settings.lr * rgn / rgn.max().clamp_min(_TINY)
        for group in ctx.optimizer.param_groups:
            # one host read per group and epoch; the optimizer keeps plain float rates
            group["lr"] = float(rates[self.group_names.index(group["name"])])

    def log_values(self) -> dict[str, float]:
        out = super().log_values()
        if self.epoch >= 0:
            out |= {f"rgn/{n}": v for n, v in
                    zip(self.group_names, self.rgn.detach().cpu().tolist(), strict=True)}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rgn": self.rgn.detach().cpu().clone(), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.rgn.copy_(state["rgn"])
        self.epoch = int(state["epoch"])


def _group_norms(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...],
                 sizes: list[int]) -> torch.Tensor:
    """The L2 norm of each consecutive run of ``sizes`` tensors, taken together."""
    squares = torch.stack([t.float().pow(2).sum() for t in tensors])
    return torch.stack([s.sum() for s in squares.split(sizes)]).sqrt()
