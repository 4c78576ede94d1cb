"""Full fine-tuning: every parameter, one learning rate (the reference baseline)."""

from __future__ import annotations

from metalr_bench.strategies.core.base import Strategy, register
from metalr_bench.strategies.core.space import LR


@register
class FullFineTune(Strategy):
    """Fine-tune every layer with the base LR and optimizer."""

    name = "full"
    search_space = {"lr": LR}
    default_rank = 0
