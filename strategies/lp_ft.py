"""LP-FT (Kumar, Raghunathan, Jones, Ma & Liang, ICLR 2022, "Fine-Tuning can Distort
Pretrained Features and Underperform Out-of-Distribution"): linear probing, then full
fine-tuning that starts from the probed head.

Why: fine-tuning every layer from a random head sends large gradients through the pre-trained
features while the head is still wrong, and that distorts them. Training the head first (a
linear probe on frozen features) and then fine-tuning everything from that head changes the
features less.

What this implementation does, within one run of ``settings.epochs`` epochs:

* epochs ``0 .. probe_epochs-1`` (the probe): only the head trains. Every other parameter gets
  ``requires_grad=False``, so it gets no gradient, and the optimizer skips it (no Adam moments,
  no weight decay, SGD or AdamW included). Its optimizer groups are also set to LR 0. Every
  module except the head is in eval mode, so BatchNorm keeps its pre-trained statistics and the
  trainer's PreciseBN leaves them alone, and dropout is off. The reference does the same: it
  extracts the probe's features with the network in eval mode.
* from epoch ``probe_epochs`` on (the fine-tuning): every layer trains at the base LR in train
  mode. The optimizer's state is cleared once, at the switch. The reference fine-tunes in a
  separate run with a fresh optimizer.

The optimizer is built once by the trainer, so it holds every layer group from the start; the
phase only changes ``requires_grad``, the group LRs (logged as ``lr/<group>``) and the train
mode, in :meth:`LPFT.on_epoch_start`. That hook gets the epoch number, so a resumed run is in
the same phase as an uninterrupted one, and it clears the optimizer state only at epoch
``probe_epochs`` exactly.

Deviations from the paper and its code (``AnanyaKumar/transfer_learning``), and why:

* The probe is a number of head-only epochs with the run's optimizer, LR and weight decay. The
  reference fits an L2-regularised logistic regression with scikit-learn on the extracted
  features and picks its inverse regularisation C from a sweep on in-distribution validation
  data. A strategy cannot do that here: it sees the model and the training steps, while the
  trainer owns the data and uses the validation split to pick the checkpoint of *every*
  strategy. Choosing C on that split as well would also favour LP-FT over the other strategies.
  The reference repository also has a gradient-trained probe (its ``linear_probe`` option, with
  the network in eval mode). Our probe is that kind.
* Both phases share the run's epoch budget. ``probe_epochs`` of the ``epochs`` are head-only,
  so LP-FT fine-tunes every layer for fewer epochs than ``full``, and its probe epochs cost
  less, because no gradient flows into the backbone. In the reference, LP and FT are separate
  runs, each with its own schedule.
* The head trains at the base LR in both phases, and one LR (``lr``, the one ``--tune``
  searches) is shared by the probe and the fine-tuning. The reference sweeps the fine-tuning LR
  on its own, with SGD and a cosine schedule. Here every strategy uses the suite's optimizer
  (Adam by default) with no schedule.
* The trainer picks the best epoch over both phases. When that is a probe epoch, the result is
  a linear probe.
"""

from __future__ import annotations

from typing import Any

from metalr_bench.strategies.core.base import Strategy, register
from metalr_bench.strategies.core.layers import modules_of
from metalr_bench.strategies.core.space import LR
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class LPFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    probe_epochs: int = Field(
        1, ge=1, description="head-only epochs (the linear probe) before every layer is "
        "fine-tuned; must be smaller than the run's epochs",
    )


@register
class LPFT(Strategy):
    """LP-FT: train only the new head for probe_epochs epochs, then fine-tune every layer."""

    name = "lp_ft"
    Params = LPFTParams
    test_params = [{"probe_epochs": 1}]
    search_space = {"lr": LR}

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        n = self.params.probe_epochs
        if n >= settings.epochs:
            raise ValueError(
                f"strategy lp_ft: probe_epochs={n} leaves no fine-tuning epoch in a run of "
                f"{settings.epochs} epoch(s); use 1 <= probe_epochs <= {settings.epochs - 1} "
                "or more epochs"
            )
        self.head_index = len(groups) - 1
        head = set(groups[-1].params)
        #: every non-head parameter (frozen during the probe)
        self.backbone = [p for name, p in model.named_parameters() if name not in head]
        self._head_modules = modules_of(model, groups[-1])
        self.probing = True
        self._apply_phase()

    def param_groups(self) -> list[dict[str, Any]]:
        # every group from the start: the optimizer is built once, before the switch
        return [self._group(i, lr=self._lr(i)) for i in range(len(self.groups))]

    def _lr(self, index: int) -> float:
        return self.settings.lr if index == self.head_index or not self.probing else 0.0

    def _apply_phase(self) -> None:
        for p in self.backbone:
            p.requires_grad_(not self.probing)
        if self.optimizer is not None:
            names = [g.name for g in self.groups]
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr(names.index(group["name"]))

    def on_epoch_start(self, epoch: int) -> None:
        self.probing = epoch < self.params.probe_epochs
        self._apply_phase()
        if epoch == self.params.probe_epochs and self.optimizer is not None:
            # fine-tuning starts like a new run from the probed weights (the reference's
            # separate FT run); a resumed run passes here at the same epoch
            self.optimizer.state.clear()

    def set_train_mode(self, model: nn.Module) -> None:
        if not self.probing:
            model.train()
            return
        model.eval()  # pre-trained BatchNorm statistics, no dropout: the probed features
        for module in self._head_modules:
            module.train()
