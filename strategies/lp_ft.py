"""LP-FT (Kumar, Raghunathan, Jones, Ma & Liang, ICLR 2022, "Fine-Tuning can Distort
Pretrained Features and Underperform Out-of-Distribution"): linear probing, then full
fine-tuning that starts from the probed head.

Why: fine-tuning every layer from a random head sends large gradients through the pre-trained
features while the head is still wrong, and that distorts them. Fitting the head first (a
linear probe on frozen features) and then fine-tuning everything from that head changes the
features less.

What this implementation does:

* before the first epoch (the probe, :mod:`metalr_bench.strategies.core.probe`, the code the
  ``linear_probe`` strategy runs too): the trainer hands the strategy the un-augmented
  training and validation images (``Strategy.before_fit``); the features of the frozen
  pre-trained network (eval mode: BatchNorm on its pre-trained statistics) are computed once and
  the new head is fitted to convergence on them, an L2-regularised logistic regression by
  full-batch L-BFGS, λ chosen on the validation loss (``probe_l2: null``) or fixed. The fitted
  head replaces the random one. Logged every epoch: ``lp_ft/probe_train_loss`` (the strategy's
  ``mechanism``), ``lp_ft/probe_val_loss``, ``lp_ft/probe_l2``.
* every epoch (the fine-tuning): every layer trains at the base LR in train mode, from the
  probed head, with a fresh optimizer, as ``full`` does.

The probe costs one forward pass over the training and validation images and a few seconds of
L-BFGS; it takes no epoch of the run's budget, so LP-FT fine-tunes for as many epochs as
``full``. A resumed run does not fit the probe again: the head is in the checkpoint's weights,
the probe's numbers in the strategy's state.

Deviations from the paper and its code (``AnanyaKumar/transfer_learning``), and why:

* The probe is fitted by L-BFGS in PyTorch on the task's own loss, not by scikit-learn's
  ``LogisticRegression``: the same convex problem (λ = 1/(C·N)), on the device, and the same
  code for single- and multi-label tasks. λ is picked by the validation *loss* over a grid of
  half decades (1e-1 .. 1e-6), the reference's C by validation accuracy. The validation split
  also selects every strategy's checkpoint; it is never the test split.
* LP and FT run in one run: FT uses the suite's epochs, optimizer (Adam by default) and base LR
  with no schedule, like every strategy. The reference fine-tunes in a separate run with SGD
  and a cosine schedule, its LR swept on its own.
* Until issue 23 the probe was ``probe_epochs`` head-only epochs with the run's optimizer
  (≈ 15 Adam steps on PneumoniaMNIST: a probe loss of ≈ 0.40 where a converged probe reaches
  0.02–0.07, i.e. nearly full fine-tuning from a random head). ``probe_epochs`` is gone; a config
  naming it gets an error that says so.
"""

from __future__ import annotations

from metalr_bench.strategies.core.base import Strategy, register
from metalr_bench.strategies.core.probe import (
    ProbeOwner,
    ProbeParams,
)
from metalr_bench.strategies.core.space import LR


@register
class LPFT(ProbeOwner, Strategy):
    """LP-FT: fit the new head to convergence on frozen features, then fine-tune every layer."""

    name = "lp_ft"
    Params = ProbeParams
    test_params = [{}, {"probe_l2": 1e-3}]
    search_space = {"lr": LR}
    mechanism = "lp_ft/probe_train_loss"

