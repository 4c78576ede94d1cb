"""Freeze all but the last k layer groups (k=1: linear probing of the head).

Frozen groups get ``requires_grad=False`` and their BatchNorm layers stay in eval mode, so
their running statistics, like their weights, remain the pre-trained ones. Logged every epoch:
``trainable_params`` (parameter elements trained) and ``trainable_share`` (their share of all
parameters), the strategy's ``mechanism``.
"""

from __future__ import annotations

from typing import Any

from metalr_bench.strategies.core.base import Strategy, register, trainable_values
from metalr_bench.strategies.core.space import LR, SearchDim
from pydantic import BaseModel, ConfigDict, Field


class LastKParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(2, ge=1, description="number of trailing layer groups to train (1 = head)")


@register
class LastK(Strategy):
    """Freeze all but the last k layer groups (k=1: linear probing of the head)."""

    name = "last_k"
    Params = LastKParams
    test_params = [{"k": 1}, {"k": 2}]
    search_space = {"lr": LR, "k": SearchDim("int", 1, "groups")}
    default_rank = 1
    mechanism = "trainable_share"

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        k = self.params.k
        if k > len(groups):
            raise ValueError(
                f"strategy last_k: k={k} is larger than the model's {len(groups)} layer groups "
                f"({', '.join(g.name for g in groups)}); use 1 <= k <= {len(groups)}"
            )
        self.frozen = groups[: len(groups) - k]
        self.freeze(self.frozen)

    def param_groups(self) -> list[dict[str, Any]]:
        start = len(self.groups) - self.params.k
        return [self._group(i, lr=self.settings.lr) for i in range(start, len(self.groups))]

    def log_values(self) -> dict[str, float]:
        """The group LRs, ``trainable_params`` and ``trainable_share`` (the ``mechanism``)."""
        return super().log_values() | trainable_values(self.model)
