"""The one training loop every strategy is measured by.

Per epoch: train (the strategy may replace the step), validate, keep the checkpoint with the
best validation metric; after the last epoch, evaluate that checkpoint on the test split once.
The test split is read in exactly one place (:meth:`Trainer._test`) and only after training.

GPU-first: data stays on the device (``datasets.tensors``), bf16 autocast and channels_last are
on by default on CUDA, and the hot loop never calls ``.item()``: losses accumulate on the device
and are read once per epoch.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from metalr_bench.benchmark.training.checkpoint import (
    CellCheckpoint,
    CheckpointMismatch,
    restore_rng,
)
from metalr_bench.benchmark.training.faults import check_finite
from metalr_bench.benchmark.training.metrics import compute_metrics, loss_fn_for, scores_from_logits
from metalr_bench.datasets.core.base import DatasetBundle, Split
from metalr_bench.datasets.core.splits import group_holdout
from metalr_bench.datasets.core.tensors import AugmentSpec, make_loader
from metalr_bench.strategies.core.base import EndContext, StepContext, Strategy
from metalr_bench.strategies.core.layers import LayerGroup
from torch import nn


@dataclass(frozen=True)
class TrainerOptions:
    epochs: int = 5
    batch_size: int = 64
    eval_batch_size: int = 256
    device: str = "cpu"
    amp: bool = False  # bf16 autocast (CUDA) / off
    channels_last: bool = False
    compile: bool = False
    augment: bool = True
    #: horizontal flips when augmenting; None: the dataset's policy (``DatasetBundle.hflip_safe``)
    hflip: bool | None = None
    #: input normalisation (``datasets.core.tensors.NORMALIZATIONS``): ImageNet mean/std for
    #: ImageNet weights, [-1, 1] otherwise (the cell builder picks it from ``model.weights``)
    normalize: str = "symmetric"
    #: training augmentation as a random resized crop of this area range instead of
    #: rotation/shift/scale (``input_pipeline: metalr_public``: (0.8, 1.0))
    resized_crop: tuple[float, float] | None = None
    selection_metric: str = "auc"
    seed: int = 0
    log_every_n_steps: int = 0  # 0: strategy values once per epoch only
    meta_fraction: float = 0.2  # held-out share of train for strategies with meta_source="holdout"
    precise_bn: bool = True  # re-estimate trainable BatchNorm statistics before each evaluation
    precise_bn_batches: int = 50
    deterministic: bool = False  # torch.use_deterministic_algorithms (exact resume on GPU too)
    #: False while tuning: the test split is then never loaded nor evaluated (result.test = {})
    evaluate_test: bool = True


class EpochCallback:
    """Receives per-epoch (and optional per-step) numbers; tracking and tuning implement it."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:  # noqa: B027
        """``metrics``: train/val losses and metrics, epoch time and the strategy's values."""

    def on_step(self, step: int, values: dict[str, float]) -> None:  # noqa: B027
        """Every ``log_every_n_steps`` steps: the strategy's values."""


@dataclass
class TrainResult:
    best_epoch: int
    best_val: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, float]]
    drift: dict[str, float]
    peak_memory_mb: float
    mean_epoch_time_s: float
    total_time_s: float
    #: images the model trained on (MetaLR with meta_source holdout: 80 % of the training set)
    n_train_images: int = 0
    #: where a meta-learning strategy drew its meta batches ("none" for the others)
    meta_source: str = "none"
    #: the weights the run started from (the trainer's own copy, for per-layer transferability)
    start_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    #: the selected checkpoint's test-set predictions: ``label`` (or ``label.<class>`` columns
    #: for multi-label) and ``prob.<class>`` per class; None when the test split was not read
    test_predictions: dict[str, list[float]] | None = None

    def data_params(self) -> dict[str, int | str]:
        """The params every run logs so a leaderboard shows what each strategy trained on."""
        return {"n_train_images": self.n_train_images, "meta_source": self.meta_source}

    def summary(self) -> dict[str, float]:
        """Flat final numbers: test metrics, best validation metrics, cost."""
        out = {f"test_{k}": v for k, v in self.test.items()}
        out |= {f"best_val_{k}": v for k, v in self.best_val.items()}
        out |= {
            "best_epoch": float(self.best_epoch),
            "peak_memory_mb": self.peak_memory_mb,
            "mean_epoch_time_s": self.mean_epoch_time_s,
            "total_time_s": self.total_time_s,
        }
        return out


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def predictions_table(labels: np.ndarray, scores: np.ndarray,
                      class_names: list[str]) -> dict[str, list[float]]:
    """Columns of a predictions table: the true label(s) and one probability per class."""
    table: dict[str, list[float]] = {}
    if labels.ndim == 2:  # multi-label: one 0/1 column per class
        table |= {f"label.{c}": labels[:, i].tolist() for i, c in enumerate(class_names)}
    else:
        table["label"] = labels.tolist()
    table |= {f"prob.{c}": scores[:, i].tolist() for i, c in enumerate(class_names)}
    return table


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device`` in its training memory format. The cell builder places the model
    before the strategy is built (a strategy may keep tensors derived from the weights); here
    again for callers that hand the trainer a model directly (a no-op when already placed)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Trainer:
    def __init__(
        self,
        bundle: DatasetBundle,
        model: nn.Module,
        groups: list[LayerGroup],
        strategy: Strategy,
        options: TrainerOptions,
        callbacks: list[EpochCallback] | None = None,
        checkpoint: CellCheckpoint | None = None,
    ) -> None:
        self.bundle = bundle
        self.checkpoint = checkpoint  # saved after every epoch when given (resume)
        self.options = options
        self.device = torch.device(options.device)
        self.model = place_model(model, self.device, options.channels_last)
        self.groups = groups
        self.strategy = strategy
        self.callbacks = callbacks or []
        self.loss_fn = loss_fn_for(bundle.task)
        self.forward = torch.compile(self.model) if options.compile else self.model
        self.optimizer = strategy.build_optimizer()
        self._start = strategy.start_state()  # the model's state, in the final model's names

        train = bundle.train
        self.meta_split: Split | None = None
        if strategy.meta_source in ("holdout", "fixed"):
            train, self.meta_split = group_holdout(
                train, options.meta_fraction, seed=options.seed, stratify=True
            )
        elif strategy.meta_source == "train":  # the training images themselves, un-augmented
            self.meta_split = train
        elif strategy.meta_source == "val":
            self.meta_split = bundle.val
        # -- meta source "first" (metalr_public): the public MetaLR code re-creates its meta
        # iterator on every call, so it always validates on the first batch of the un-shuffled,
        # un-augmented training set; nothing is held out
        elif strategy.meta_source == "first":
            self.meta_split = train
        # -- end of meta source "first"
        elif strategy.meta_source is not None:
            raise ValueError(
                f"strategy {strategy.name!r} asks for meta_source={strategy.meta_source!r}; "
                "expected train, holdout, fixed, val or first"
            )
        #: what this run trains on, logged with every run (a fair comparison shows it)
        self.n_train_images = len(train)
        self.test_predictions: dict[str, list[float]] | None = None
        common = dict(device=self.device, channels_last=options.channels_last,
                      image_size=bundle.image_size, in_channels=bundle.in_channels,
                      normalize=options.normalize)
        self.train_loader = make_loader(
            train, options.batch_size, shuffle=True, drop_last=True, seed=options.seed,
            augment=AugmentSpec(hflip=bundle.hflip_safe if options.hflip is None
                                else options.hflip, resized_crop=options.resized_crop)
            if options.augment else None, **common,
        )
        self._eval_loaders = {
            name: make_loader(split, options.eval_batch_size, shuffle=False, **common)
            for name, split in (("val", bundle.val), ("test", bundle.test))
            if name == "val" or options.evaluate_test
        }
        self._common = common
        self._epoch = -1  # for divergence messages from evaluate()
        self._meta_pos: tuple[Any, int] | None = None  # (loader state at pass start, batches drawn)
        self._meta_iter = self._meta_batches(common) if self.meta_split is not None else None
        self._bn_loader = make_loader(train, options.batch_size, shuffle=False, **common)

    # -- helpers ----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.options.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _meta_batches(
        self, common: dict[str, Any], resume: tuple[Any, int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless meta batches: re-sampled each call, or one fixed batch (``fixed``).

        The position (loader RNG state at the start of the current pass + batches drawn) is kept
        in ``_meta_pos`` so a resumed run draws exactly the batches an uninterrupted one would.
        """
        assert self.meta_split is not None
        # -- meta source "first": the same first un-shuffled batch every time (no RNG, no
        # position to resume: a resumed run rebuilds the same batch)
        if self.strategy.meta_source == "first":
            first = next(iter(make_loader(
                self.meta_split, self.strategy.meta_batch_size or self.options.batch_size,
                shuffle=False, **common,
            )))
            while True:
                yield first
        # -- end of meta source "first"
        loader = make_loader(
            self.meta_split, self.strategy.meta_batch_size or self.options.batch_size,
            shuffle=True, seed=self.options.seed + 1, drop_last=True, **common,
        )
        if self.strategy.meta_source == "fixed":
            batch = next(iter(loader))
            while True:
                yield batch
        skip = 0
        if resume is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(resume[0])
            skip = resume[1]
        while True:
            start = loader.state_dict() if hasattr(loader, "state_dict") else None
            for i, batch in enumerate(loader):
                self._meta_pos = (start, i + 1)
                if i < skip:
                    continue
                yield batch
            skip = 0

    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, epoch: int, step: int
                   ) -> torch.Tensor:
        """One optimisation step on ``(x, y)``: the strategy's own step, else the default one.
        The training loop and the throughput benchmark both step through here, so a benchmark
        times exactly what a run does (the compiled forward included)."""
        ctx = StepContext(
            model=self.model, optimizer=self.optimizer, loss_fn=self.loss_fn,
            autocast=self.autocast, epoch=epoch, step=step,
            meta_batch=(lambda: next(self._meta_iter)) if self._meta_iter else None,
            forward=self.forward, compile=self.options.compile,
        )
        loss = self.strategy.train_step(ctx, (x, y))
        return self._default_step(x, y) if loss is None else loss

    def _default_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.forward(x), y)
            extra = self.strategy.loss_term(self.model)
            total = loss if extra is None else loss + extra
        total.backward()
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def recalibrate_bn(self) -> None:
        """PreciseBN (Wu & Johnson, 2021): exact BatchNorm statistics of the current weights.

        Why: fine-tuning a few hundred images for a few dozen steps moves the weights faster than
        BatchNorm's running averages (momentum 0.1) follow, so eval-mode predictions collapse
        (seen here: train-mode accuracy 0.77, eval-mode 0.57 on the same weights). Re-estimating
        the statistics of the *trainable* BatchNorm layers over training batches (no augmentation)
        before each evaluation fixes that identically for every strategy; BatchNorm layers a
        strategy keeps in eval mode (last-k's frozen groups) are left untouched.
        """
        self.strategy.set_train_mode(self.model)
        bns = [m for m in self.model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               and m.track_running_stats]
        if not bns:
            return
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        for i, (x, _) in enumerate(self._bn_loader):
            if i >= self.options.precise_bn_batches:
                break
            with self.autocast():
                # eager on purpose: with momentum None, BatchNorm reads num_batches_tracked as
                # a Python float, which would recompile the compiled forward and break its graph
                self.model(x)
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Loss and metrics on ``split`` ("val" or "test") with the current weights."""
        self.model.eval()
        logits, labels = [], []
        for x, y in self._eval_loaders[split]:
            with self.autocast():
                logits.append(self.forward(x).float())
            labels.append(y)
        out = torch.cat(logits)
        y = torch.cat(labels)
        loss = float(self.loss_fn(out, y))
        check_finite(self._epoch, {f"{split}_loss": loss})  # NaN outputs: diverged weights
        scores = scores_from_logits(self.bundle.task, out).cpu().numpy()
        y_np = y.cpu().numpy()
        if split == "test":  # kept for the run's predictions artifact (pooled CV reports)
            self.test_predictions = predictions_table(y_np, scores, self.bundle.class_names)
        return {"loss": loss, **compute_metrics(self.bundle.task, y_np, scores)}

    def _better(self, val: dict[str, float], best: dict[str, float] | None) -> bool:
        if best is None:
            return True
        key = self.options.selection_metric
        a, b = val.get(key, math.nan), best.get(key, math.nan)
        if math.isnan(a) or math.isnan(b) or a == b:
            return val["loss"] < best["loss"]
        return a > b

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self, loop: dict[str, Any]) -> dict[str, Any]:
        """Everything an exact resume needs (RNG states are added by the checkpoint)."""
        return {
            **loop,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "train_loader": getattr(self.train_loader, "state_dict", dict)(),
            "meta_pos": self._meta_pos,
        }

    def load_state_dict(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Restore a checkpoint payload; returns the loop variables to continue from."""
        state = payload["trainer"]
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointMismatch(f"resume checkpoint does not match the model: {exc}") from exc
        self.strategy.load_state_dict(state["strategy"])
        if state.get("train_loader") and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state["train_loader"])
        if self.meta_split is not None and state.get("meta_pos") is not None:
            self._meta_pos = state["meta_pos"]
            self._meta_iter = self._meta_batches(self._common, resume=self._meta_pos)
        restore_rng(payload["rng"])
        keys = ("epoch", "history", "best_val", "best_epoch", "best_state", "step", "elapsed_s")
        return {k: state[k] for k in keys}

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, resume: dict[str, Any] | None = None) -> TrainResult:
        """Train; ``resume`` (a :class:`CellCheckpoint` payload) continues after its epoch."""
        t_start = time.perf_counter()
        if self.options.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        history: list[dict[str, float]] = []
        best_val, best_epoch, best_state = None, -1, None
        step, first_epoch, elapsed_before = 0, 0, 0.0
        if resume is not None:
            loop = self.load_state_dict(resume)
            history, best_val, best_epoch = loop["history"], loop["best_val"], loop["best_epoch"]
            best_state, step = loop["best_state"], loop["step"]
            first_epoch, elapsed_before = loop["epoch"] + 1, loop["elapsed_s"]
        n = self.options.log_every_n_steps
        for epoch in range(first_epoch, self.options.epochs):
            t0 = time.perf_counter()
            self.strategy.on_epoch_start(epoch)
            self.strategy.set_train_mode(self.model)
            loss_sum = torch.zeros((), device=self.device)
            n_batches = 0
            for x, y in self.train_loader:
                loss = self.train_step(x, y, epoch=epoch, step=step)
                loss_sum += loss.float()
                n_batches += 1
                step += 1
                if n and step % n == 0:
                    values = self.strategy.log_values()
                    for cb in self.callbacks:
                        cb.on_step(step, values)
            train_loss = float(loss_sum) / max(n_batches, 1)  # the epoch's one sync
            check_finite(epoch, {"train_loss": train_loss})
            self._epoch = epoch
            val = self._evaluate_val()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            record = {
                "train_loss": train_loss,
                **{f"val_{k}": v for k, v in val.items()},
                "epoch_time_s": time.perf_counter() - t0,
                **self.strategy.log_values(),
            }
            history.append(record)
            if self._better(val, best_val):
                best_val, best_epoch = val, epoch
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            for cb in self.callbacks:
                cb.on_epoch_end(epoch, record)
            if self.checkpoint is not None:
                self.checkpoint.save(self.state_dict({
                    "epoch": epoch, "history": history, "best_val": best_val,
                    "best_epoch": best_epoch, "best_state": best_state, "step": step,
                    "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                }))
        assert best_state is not None and best_val is not None, "epochs must be >= 1"
        self.model.load_state_dict(best_state)
        # the strategy's last word on the selected weights (LoRA merges, WiSE-FT interpolates);
        # new validation numbers replace the checkpoint's: best_val is the tested model's
        end_val = self.strategy.on_train_end(EndContext(
            model=self.model, evaluate_val=self._evaluate_val,
            selection_metric=self.options.selection_metric, best_val=dict(best_val)))
        if end_val is not None:
            best_val = end_val
        test = self._test() if self.options.evaluate_test else {}
        times = [h["epoch_time_s"] for h in history]
        return TrainResult(
            best_epoch=best_epoch,
            best_val={k: v for k, v in best_val.items()},
            test=test,
            history=history,
            drift=self.drift(),
            peak_memory_mb=_peak_memory_mb(self.device),
            mean_epoch_time_s=float(np.mean(times)),
            total_time_s=elapsed_before + time.perf_counter() - t_start,
            n_train_images=self.n_train_images,
            start_state=self._start,
            test_predictions=self.test_predictions if self.options.evaluate_test else None,
            meta_source=self.strategy.meta_source or "none",
        )

    def _evaluate_val(self) -> dict[str, float]:
        """Validation numbers of the current weights, measured as every epoch's are."""
        if self.options.precise_bn:
            self.recalibrate_bn()
        return self.evaluate("val")

    def _test(self) -> dict[str, float]:
        """The only read of the test split: once, on the selected checkpoint."""
        return self.evaluate("test")

    def drift(self) -> dict[str, float]:
        """Per layer group: ||θ − θ_pretrained|| / ||θ_pretrained|| over its parameters."""
        now = dict(self.model.named_parameters())
        out = {}
        for g in self.groups:
            num = sum(float((now[p].detach() - self._start[p]).pow(2).sum()) for p in g.params)
            den = sum(float(self._start[p].pow(2).sum()) for p in g.params)
            out[g.name] = math.sqrt(num) / math.sqrt(den) if den > 0 else 0.0
        return out


