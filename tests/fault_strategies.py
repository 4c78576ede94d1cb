"""Test-only strategies that misbehave on purpose (NaN loss, OOM, slow epochs, Ctrl-C).

Registered only inside tests (:func:`registered`) or in a test subprocess (:func:`register_all`)
so they never show up in `run-benchmark list`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch
from metalr_bench.strategies.core.base import STRATEGIES, Strategy


class NanLoss(Strategy):
    """Plain fine-tuning whose loss term turns NaN from epoch 1 on."""

    name = "nan_loss"

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def loss_term(self, model):
        if self.epoch < 1:
            return None
        return float("nan") * sum(p.sum() for p in model.parameters())  # NaN gradients too


class OutOfMemoryStrategy(Strategy):
    """Raises the error CUDA raises when a batch does not fit."""

    name = "oom"

    def train_step(self, ctx, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class Sleepy(Strategy):
    """Plain fine-tuning that sleeps ``$SLEEPY_S`` seconds before epochs >= 1 (kill window)."""

    name = "sleepy"

    def on_epoch_start(self, epoch: int) -> None:
        if epoch >= 1:
            time.sleep(float(os.environ.get("SLEEPY_S", "0")))


class InterruptOnce(Strategy):
    """Plain fine-tuning; raises KeyboardInterrupt before epoch 1 while ``armed`` is set."""

    name = "interrupt_once"
    armed = False

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == 1 and InterruptOnce.armed:
            InterruptOnce.armed = False
            raise KeyboardInterrupt


ALL = (NanLoss, OutOfMemoryStrategy, Sleepy, InterruptOnce)


def register_all() -> None:
    for cls in ALL:
        STRATEGIES[cls.name] = cls


@contextlib.contextmanager
def registered() -> Iterator[None]:
    register_all()
    try:
        yield
    finally:
        for cls in ALL:
            STRATEGIES.pop(cls.name, None)


def warn_and_capture(cfg, tracker, data, text: str) -> str:
    """A worker's unit of work (``fn(cfg, tracker, data, *call)``) that raises a
    :class:`DatasetWarning` as a dataset loader does, and returns what the worker printed for
    it on stderr (so the test reads the worker's own output, not a log relayed by Ray)."""
    import io
    import warnings
    from contextlib import redirect_stderr

    from metalr_bench.datasets.core.errors import DatasetWarning

    buf = io.StringIO()
    with warnings.catch_warnings(), redirect_stderr(buf):
        warnings.simplefilter("always")
        warnings.warn(DatasetWarning(text), stacklevel=1)
    return buf.getvalue()
