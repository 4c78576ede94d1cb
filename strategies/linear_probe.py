"""Linear probing (as in Kumar, Raghunathan, Jones, Ma & Liang, ICLR 2022, "Fine-Tuning can
Distort Pretrained Features and Underperform Out-of-Distribution", its LP baseline; ref.
``AnanyaKumar/transfer_learning``): the pre-trained network stays as it is and only the new head
is fitted, to convergence, on its frozen features.

The probe is LP-FT's first phase, one piece of code (:mod:`metalr_bench.strategies.core.probe`):
before the first epoch the trainer hands the strategy the un-augmented training and validation
images (``Strategy.before_fit``); the features of the frozen network (eval mode, BatchNorm on its
pre-trained statistics) are computed once and the head is fitted by full-batch L-BFGS on the
task's loss + λ/2·‖W‖², λ picked on the validation loss (``probe_l2: null``) or fixed.

Then nothing moves: the backbone's parameters have ``requires_grad=False`` and its modules stay
in eval mode (the trainer's PreciseBN leaves its statistics alone), and the training step only
measures the task loss (no gradient, no optimizer step), so the head stays the probe's solution
and the run's epochs only evaluate it (forward passes: cheap). The suite's ``last_k`` with
``k: 1`` is the other linear probe: head-only epochs of the run's optimizer, which on our data
stops far from convergence.

Logged every epoch: ``linear_probe/probe_train_loss`` (the strategy's ``mechanism``),
``linear_probe/probe_val_loss`` and ``linear_probe/probe_l2``.

Deviations from the reference, and why: the fit is L-BFGS in PyTorch, not scikit-learn's
``LogisticRegression`` (the same convex problem with λ = 1/(C·N), on the device, single- and
multi-label alike), and λ is picked by validation loss over half decades 1e-1 .. 1e-6, the
reference's C by validation accuracy. ``--tune`` searches ``probe_l2`` instead (by the suite's
selection metric); there is no learning rate to tune.
"""

from __future__ import annotations

from typing import Any

import torch
from metalr_bench.strategies.core.base import StepContext, Strategy, register
from metalr_bench.strategies.core.probe import (
    ProbeOwner,
    ProbeParams,
)
from metalr_bench.strategies.core.space import SearchDim
from torch import nn


@register
class LinearProbe(ProbeOwner, Strategy):
    """Linear probe: the new head fitted to convergence on frozen features (Kumar et al. 2022)."""

    name = "linear_probe"
    Params = ProbeParams
    test_params = [{}, {"probe_l2": 1e-3}]
    search_space = {"probe_l2": SearchDim("float", 1e-6, 1e-1, log=True)}
    mechanism = "linear_probe/probe_train_loss"

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)  # checks the head the probe fits
        self.freeze(groups[:-1])

    def param_groups(self) -> list[dict[str, Any]]:
        # the optimizer holds the head but never steps (``train_step``)
        return [self._group(len(self.groups) - 1, lr=self.settings.lr)]

    def set_train_mode(self, model: nn.Module) -> None:
        model.eval()  # nothing trains: pre-trained statistics, no dropout

    def train_step(self, ctx: StepContext, batch: tuple[torch.Tensor, torch.Tensor]
                   ) -> torch.Tensor:
        """The task loss of the probed model on ``batch``; no update."""
        x, y = batch
        forward = ctx.model if ctx.forward is None else ctx.forward
        with torch.no_grad(), ctx.autocast():
            return ctx.loss_fn(forward(x), y).detach()

