"""BSS (Chen et al., NeurIPS 2019, "Catastrophic Forgetting Meets Negative Transfer: Batch
Spectral Shrinkage for Safe Transfer Learning"): shrink the smallest singular values of the
batch's features, the directions fine-tuning would otherwise fit to noise (negative transfer).

    L = L_task + η · Σ_{i=1..k} σ²_{-i}(F)

F is the batch's penultimate feature matrix (batch × feature dim: the input of the head, kept by
a forward hook on the head module), σ_{-i} its i-th smallest singular value. The penalty is added
to plain fine-tuning (every layer at the base LR, the benchmark's optimizer and weight decay).

Defaults: k = 1, η = 0.001, as the paper and the reference code (thuml/Transfer-Learning-Library).
Logged per epoch: ``bss/penalty`` and ``bss/penalty_share`` (the ``mechanism``). On CUDA the SVD
synchronises the host once per step.

Deviations (``svdvals`` in float32, k clamped to min(batch, dim), feature maps flattened):
docs/strategies.md, section ``bss``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from metalr_bench.strategies.core.base import Strategy, register
from metalr_bench.strategies.core.penalty import PenaltyMeter
from metalr_bench.strategies.core.space import LR, SearchDim
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class BSSParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(1, ge=1, description="how many of the smallest singular values to shrink")
    eta: float = Field(0.001, ge=0, description="η, the weight of the penalty")


def _keep_input(store: dict[str, torch.Tensor]) -> Any:
    """A forward hook keeping its module's input in ``store`` (only while gradients are on)."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled():
            store["features"] = args[0]

    return hook


def spectral_penalty(features: torch.Tensor, k: int) -> torch.Tensor:
    """Σ_{i=1..k} σ²_{-i}(F): the k smallest squared singular values of ``features`` (batch × ...,
    flattened per image), computed in float32."""
    s = torch.linalg.svdvals(features.flatten(1).float())  # descending
    return s[-min(k, s.shape[-1]):].pow(2).sum()


@register
class BSS(Strategy):
    """BSS: shrink the smallest singular values of the penultimate features (NeurIPS 2019)."""

    name = "bss"
    Params = BSSParams
    test_params = [{"k": 1, "eta": 0.001}, {"k": 2, "eta": 0.01}]
    search_space = {"lr": LR, "eta": SearchDim("float", 1e-4, 1e-1, log=True)}
    mechanism = "bss/penalty_share"

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        head = groups[-1].modules
        if len(head) != 1:
            raise ValueError(f"bss needs a head made of one module; the last layer group "
                             f"{groups[-1].name!r} holds {list(head)}")
        self._store: dict[str, torch.Tensor] = {}
        handle = model.get_submodule(head[0]).register_forward_hook(_keep_input(self._store))
        weakref.finalize(self, handle.remove)
        device = next(model.parameters()).device
        self.meter = PenaltyMeter(self.name, device)

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        features = self._store.pop("features", None)
        if features is None:
            raise RuntimeError("bss: no features from the head's forward hook; loss_term must "
                               "follow a forward of the model with gradients enabled")
        penalty = self.params.eta * spectral_penalty(features, self.params.k)
        self.meter.add_penalty(penalty)
        return penalty

    def on_epoch_start(self, epoch: int) -> None:
        self.meter.reset()

    def after_step(self, loss: torch.Tensor) -> None:
        self.meter.add_task_loss(loss)

    def log_values(self) -> dict[str, float]:
        return super().log_values() | self.meter.values()
