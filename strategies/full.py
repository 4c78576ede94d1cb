"""Full fine-tuning: every parameter, one learning rate (the reference baseline)."""

from __future__ import annotations

from metalr_bench.strategies.base import Strategy, register


@register
class FullFineTune(Strategy):
    """Fine-tune every layer with the base LR and optimizer."""

    name = "full"
