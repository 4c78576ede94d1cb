"""Layer-wise learning-rate decay: lr_g = lr · decay^(G−1−g) for group g of G (head: g=G−1).

The rates are set directly on the optimizer's parameter groups (not as a scale key that a
scheduler could ignore), so what is logged is what the optimizer uses.
"""

from __future__ import annotations

from typing import Any

from metalr_bench.strategies.core.base import Strategy, register
from metalr_bench.strategies.core.space import LR, SearchDim
from pydantic import BaseModel, ConfigDict, Field


class LayerDecayParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decay: float = Field(0.75, gt=0, le=1, description="per-group LR multiplier, head = 1")


@register
class LayerDecay(Strategy):
    """Layer-wise LR decay: lr · decay^(depth from the head) per layer group."""

    name = "layer_decay"
    Params = LayerDecayParams
    test_params = [{"decay": 0.5}]
    search_space = {"lr": LR, "decay": SearchDim("float", 0.3, 1.0)}
    default_rank = 3
    mechanism = "lr_spread"

    def group_lrs(self) -> list[float]:
        n = len(self.groups)
        return [self.settings.lr * self.params.decay ** (n - 1 - g) for g in range(n)]

    def param_groups(self) -> list[dict[str, Any]]:
        return [self._group(i, lr=lr) for i, lr in enumerate(self.group_lrs())]
