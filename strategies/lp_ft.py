"""LP-FT (Kumar, Raghunathan, Jones, Ma & Liang, ICLR 2022, "Fine-Tuning can Distort
Pretrained Features and Underperform Out-of-Distribution"): linear probing, then full
fine-tuning that starts from the probed head.

Before the first epoch the new head is fitted to convergence on the frozen pre-trained features
(the shared probe, :mod:`metalr_bench.strategies.core.probe`: L2-regularised logistic regression
by full-batch L-BFGS, λ chosen on the validation loss or fixed by ``probe_l2``); then every layer
fine-tunes at the base LR for all ``epochs`` from that head, as ``full`` does. Logged:
``lp_ft/probe_train_loss`` (the ``mechanism``), ``lp_ft/probe_val_loss``, ``lp_ft/probe_l2``.

Defaults: ``probe_l2: null`` (chosen from 1e-1 .. 1e-6 in half decades). A resumed run does not
fit the probe again.

Deviations (L-BFGS in PyTorch instead of scikit-learn, λ by validation loss, LP and FT in one
run with the suite's optimizer; ``probe_epochs`` removed in issue 23): docs/strategies.md,
section ``lp_ft``.
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

