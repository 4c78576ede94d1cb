"""L2-SP (Li, Grandvalet & Davoine, ICML 2018): stay close to the pre-trained starting point.

    Ω(w) = α/2 · ||w_S − w_S⁰||²  +  β/2 · ||w_head||²

w_S are the pre-trained (backbone) weights and w_S⁰ their starting values; the new head gets
plain L2. No ordinary weight decay is added on top (the optimizer's weight_decay is set to 0),
and BatchNorm parameters and biases are excluded by default, as in the paper's code.

Logged per epoch (epoch means, :mod:`metalr_bench.strategies.core.penalty`): ``l2sp/penalty``,
the pull α/2 · ||w_S − w_S⁰||² as it enters the loss (0 at the start, it grows as the backbone
drifts), and ``l2sp/penalty_share`` = penalty / (task loss + penalty), the strategy's
``mechanism``; the new head's plain L2 (β) is not part of it (it is weight decay by another name,
non-zero from the first step), it is logged as ``l2sp/head_penalty``.
"""

from __future__ import annotations

from typing import Any

import torch
from metalr_bench.strategies.core.base import Strategy, register
from metalr_bench.strategies.core.penalty import PenaltyMeter
from metalr_bench.strategies.core.space import LR, SearchDim
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class L2SPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.1, ge=0, description="weight of the pull towards the pre-trained w")
    beta: float = Field(0.01, ge=0, description="L2 weight on the new head")
    exclude_bn_bias: bool = True


def _regularised(model: nn.Module, name: str, p: torch.Tensor) -> bool:
    """True for conv/linear weights; False for biases and normalisation parameters."""
    if p.ndim <= 1:  # biases, BN/LayerNorm weights
        return False
    module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return not isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)


@register
class L2SP(Strategy):
    """L2-SP: penalise the distance to the pre-trained weights (Li et al., ICML 2018)."""

    name = "l2sp"
    Params = L2SPParams
    test_params = [{"alpha": 0.1, "beta": 0.01}]
    search_space = {"lr": LR, "alpha": SearchDim("float", 1e-3, 1.0, log=True)}
    default_rank = 2
    mechanism = "l2sp/penalty_share"

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        head = set(groups[-1].params)
        keep = (lambda n, p: _regularised(model, n, p)) if self.params.exclude_bn_bias else (
            lambda n, p: True
        )
        named = dict(model.named_parameters())
        self.backbone = [(named[n], named[n].detach().clone()) for n in named
                         if n not in head and keep(n, named[n])]
        self.head = [named[n] for n in named if n in head and keep(n, named[n])]
        self.meter = PenaltyMeter(self.name, next(model.parameters()).device)
        self.head_meter = PenaltyMeter(f"{self.name}/head", self.meter.device)

    def param_groups(self) -> list[dict[str, Any]]:
        # the penalty replaces weight decay: no plain decay on top
        return [self._group(i, lr=self.settings.lr, weight_decay=0.0)
                for i in range(len(self.groups))]

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        zero = torch.zeros((), device=self.meter.device)
        sp = 0.5 * self.params.alpha * sum((((w - w0) ** 2).sum() for w, w0 in self.backbone),
                                           zero)
        head = 0.5 * self.params.beta * sum(((w**2).sum() for w in self.head), zero)
        self.meter.add_penalty(sp)
        self.head_meter.add_penalty(head)
        return sp + head

    def on_epoch_start(self, epoch: int) -> None:
        self.meter.reset()
        self.head_meter.reset()

    def after_step(self, loss: torch.Tensor) -> None:
        self.meter.add_task_loss(loss)

    def log_values(self) -> dict[str, float]:
        head = self.head_meter.values().get(f"{self.name}/head/penalty")
        extra = {} if head is None else {f"{self.name}/head_penalty": head}
        return super().log_values() | self.meter.values() | extra
