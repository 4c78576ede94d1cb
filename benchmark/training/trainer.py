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
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from metalr_bench.benchmark.training.checkpoint import (
    CellCheckpoint,
    CheckpointMismatch,
    restore_rng,
)
from metalr_bench.benchmark.training.faults import check_finite, kill_now, kill_point
from metalr_bench.benchmark.training.metrics import compute_metrics, loss_fn_for, scores_from_logits
from metalr_bench.datasets.core.base import DatasetBundle, Split
from metalr_bench.datasets.core.meta import open_meta_source
from metalr_bench.datasets.core.tensors import AugmentSpec, make_loader
from metalr_bench.strategies.core.base import EndContext, FitData, StepContext, Strategy
from metalr_bench.strategies.core.layers import LayerGroup
from torch import nn


@dataclass(frozen=True)
class TrainerSettings:
    """How the trainer runs a cell: epochs, batch sizes, device, augmentation, model selection.
    *Settings*, like the strategy's ``TrainSettings``: a run's knobs ("options" are a dataset
    adapter's). Built from the config by ``training.cell.trainer_settings``."""

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
    #: that crop's aspect-ratio range (``metalr_public*`` pipelines: the code's (0.8, 1.25))
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    selection_metric: str = "auc"
    seed: int = 0
    log_every_n_steps: int = 0  # 0: strategy values once per epoch only
    meta_fraction: float = 0.2  # held-out share of train for strategies with meta_source="holdout"
    precise_bn: bool = True  # re-estimate trainable BatchNorm statistics before each evaluation
    precise_bn_batches: int = 50
    deterministic: bool = False  # torch.use_deterministic_algorithms (exact resume on GPU too)
    #: False while tuning: the test split is then never loaded nor evaluated (result.test = {})
    evaluate_test: bool = True
    #: multi-step learning-rate decay: at the start of each of these epochs (0-based, so 50 is
    #: the 51st) every optimizer group's lr is multiplied by ``lr_gamma``, as torch's
    #: ``MultiStepLR`` stepped once per epoch does (MedMNIST v2's recipe: (50, 75) of 100,
    #: gamma 0.1); empty (the default): the strategy's rates are left alone
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1


class TrainerCallback(Protocol):
    """Receives the trainer's numbers; tracking, tuning and the pre-training's progress lines
    implement it. Named for when each is called: ``on_epoch_end`` after each epoch,
    ``on_log_step`` on every ``log_every_n_steps``-th training step, ``on_step_values`` at the
    end of each epoch with every step's values.

    A protocol: any object with these three methods is one (tracking's ``MetricsLogger`` does
    not import the trainer); subclassing it inherits no-op defaults."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """``metrics``: train/val losses and metrics, epoch time and the strategy's values."""

    def on_log_step(self, step: int, values: dict[str, float]) -> None:
        """Every ``log_every_n_steps`` steps: the strategy's values."""

    def on_step_values(self, step: int, values: dict[str, float]) -> None:  # noqa: B027
        """The strategy's per-training-step values (``Strategy.step_values``) of ``step``, each
        under its own key; called for every step of an epoch at its end, before
        ``on_epoch_end``."""


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
    #: parameters with ``requires_grad`` once the strategy was built (the report's cost table)
    n_trainable_params: int = 0
    #: whose choice of meta batches that follows (MetaLR: ``public_code``, training images, or
    #: ``paper``, a held-out validation batch; "none" for the others)
    meta_reference: str = "none"
    #: the weights the run started from (the trainer's own copy, for per-layer transferability)
    start_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    #: the selected checkpoint's test-set predictions: ``label`` (or ``label.<class>`` columns
    #: for multi-label) and ``prob.<class>`` per class; None when the test split was not read
    test_predictions: dict[str, list[float]] | None = None
    #: the selected checkpoint's weights (θ_B), which the model holds after ``fit``
    final_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    #: files the strategy wants logged with the run (``Strategy.artifacts()``: name -> figure),
    #: filled by ``train_cell``
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)
    #: numbers the strategy logs once with the final metrics (``Strategy.final_values()``:
    #: WiSE-FT's chosen α and its validation curve over α)
    final_values: dict[str, float] = field(default_factory=dict)
    #: the tested model's validation numbers when the strategy's ``on_train_end`` changed the
    #: selected checkpoint and measured it again (WiSE-FT: θ(α*)), else None; the tuning
    #: objective reads them, so a study tunes the model the row reports
    end_val: dict[str, float] | None = None
    #: seconds of work the strategy did once per run (``Strategy.one_off``: probe fit, α sweep,
    #: attention pass), kept out of ``epoch_time_s``; logged as ``oneoff_time_s`` (their sum,
    #: 0 for a strategy with none) and ``oneoff_time_s/<name>``
    oneoff_times: dict[str, float] = field(default_factory=dict)
    #: test metrics of the last epoch's weights as trained (before the strategy's end step),
    #: beside ``test`` (the checkpoint chosen on validation): MedMNIST v2's script keeps
    #: ``best_model = model``, a reference, so the figure it reports is the last epoch's model;
    #: this makes our row comparable with it. Empty when the test split was not read
    last_test: dict[str, float] = field(default_factory=dict)

    def data_params(self) -> dict[str, int | str]:
        """The params every run logs so a leaderboard shows what each strategy trained on."""
        return {"n_train_images": self.n_train_images, "meta_source": self.meta_source,
                "n_trainable_params": self.n_trainable_params,
                "metalr_meta_reference": self.meta_reference}

    def summary(self) -> dict[str, float]:
        """Flat final numbers: test metrics, best validation metrics, cost."""
        out = {f"test_{k}": v for k, v in self.test.items()}
        out |= {f"last_test_{k}": v for k, v in self.last_test.items()}
        out |= {f"best_val_{k}": v for k, v in self.best_val.items()}
        out |= {
            "best_epoch": float(self.best_epoch),
            "peak_memory_mb": self.peak_memory_mb,
            "mean_epoch_time_s": self.mean_epoch_time_s,
            "total_time_s": self.total_time_s,
            "oneoff_time_s": float(sum(self.oneoff_times.values())),
            **{f"oneoff_time_s/{k}": v for k, v in sorted(self.oneoff_times.items())},
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
    """``model`` on ``device`` in its training memory format: once, by the cell builder, before
    the strategy is built (a strategy may keep tensors derived from the weights). The trainer
    only checks it (:func:`_check_placed`)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _check_placed(model: nn.Module, device: torch.device) -> None:
    wrong = next((n for n, p in model.named_parameters() if p.device.type != device.type), None)
    if wrong is not None:
        raise ValueError(
            f"the model's parameter {wrong!r} is not on the trainer's device {device}; build the "
            "cell with training.cell.build_parts (or call place_model before the strategy is built)"
        )


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
        settings: TrainerSettings,
        callbacks: list[TrainerCallback] | None = None,
        checkpoint: CellCheckpoint | None = None,
    ) -> None:
        self.bundle = bundle
        self.checkpoint = checkpoint  # saved after every epoch when given (resume)
        self.settings = settings
        self.device = torch.device(settings.device)
        _check_placed(model, self.device)
        self.model = model
        self.groups = groups
        self.strategy = strategy
        self.callbacks = callbacks or []
        self.loss_fn = loss_fn_for(bundle.task)
        self.forward = torch.compile(self.model) if settings.compile else self.model
        strategy.build_optimizer()  # the strategy owns it: ``self.optimizer`` reads it
        self._start = strategy.start_state()  # the model's state, in the final model's names
        self.n_trainable_params = sum(p.numel() for p in self.model.parameters()
                                      if p.requires_grad)

        common = dict(device=self.device, channels_last=settings.channels_last,
                      image_size=bundle.image_size, in_channels=bundle.in_channels,
                      normalize=settings.normalize)
        # the strategy's meta source (``datasets.core.meta``): what the model trains on, and
        # the meta batches with their own resume position
        self.meta = open_meta_source(
            strategy.meta_source, bundle, fraction=settings.meta_fraction, seed=settings.seed,
            batch_size=strategy.meta_batch_size or settings.batch_size,
            loader=lambda split, batch_size, **kw: make_loader(split, batch_size, **kw,
                                                               **common),
            owner=strategy.name,
        )
        train = self.meta.train
        self.meta_split: Split | None = self.meta.split
        #: what this run trains on, logged with every run (a fair comparison shows it)
        self.n_train_images = len(train)
        self.train_loader = make_loader(
            train, settings.batch_size, shuffle=True, drop_last=True, seed=settings.seed,
            augment=AugmentSpec(hflip=bundle.hflip_safe if settings.hflip is None
                                else settings.hflip, resized_crop=settings.resized_crop,
                                crop_ratio=settings.crop_ratio)
            if settings.augment else None, **common,
        )
        self._eval_loaders = {
            name: make_loader(split, settings.eval_batch_size, shuffle=False, **common)
            for name, split in (("val", bundle.val), ("test", bundle.test))
            if name == "val" or settings.evaluate_test
        }
        self._epoch = -1  # for divergence messages from evaluate()
        self._meta_iter = self.meta.batches
        self._bn_loader = make_loader(train, settings.batch_size, shuffle=False, **common)

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The strategy's optimizer (the strategy builds and owns it)."""
        assert self.strategy.optimizer is not None
        return self.strategy.optimizer

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.settings.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, epoch: int, step: int
                   ) -> torch.Tensor:
        """One optimisation step on ``(x, y)``: the strategy's own step, else the default one.
        The training loop and the throughput benchmark both step through here, so a benchmark
        times exactly what a run does (the compiled forward included)."""
        ctx = StepContext(
            model=self.model, optimizer=self.optimizer, loss_fn=self.loss_fn,
            autocast=self.autocast, epoch=epoch, step=step,
            meta_batch=(lambda: next(self._meta_iter)) if self._meta_iter else None,
            forward=self.forward, compile=self.settings.compile,
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
            if i >= self.settings.precise_bn_batches:
                break
            with self.autocast():
                # eager on purpose: with momentum None, BatchNorm reads num_batches_tracked as
                # a Python float, which would recompile the compiled forward and break its graph
                self.model(x)
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum

    @torch.no_grad()
    def predict(self, split: str) -> tuple[float, np.ndarray, np.ndarray]:
        """(loss, labels, scores) on ``split`` ("val" or "test") with the current weights; no
        state is kept (the test split's predictions go into the result, not the trainer)."""
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
        return loss, y.cpu().numpy(), scores

    def evaluate(self, split: str) -> dict[str, float]:
        """Loss and metrics on ``split`` ("val" or "test") with the current weights."""
        loss, y, scores = self.predict(split)
        return {"loss": loss, **compute_metrics(self.bundle.task, y, scores)}

    def _better(self, val: dict[str, float], best: dict[str, float] | None) -> bool:
        if best is None:
            return True
        key = self.settings.selection_metric
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
            "meta_pos": self.meta.batches.state_dict() if self.meta.batches else None,
            "oneoff_times": dict(self.strategy.__dict__.get("oneoff_times", {})),
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
        if self.meta.batches is not None:
            self.meta.batches.load_state_dict(state.get("meta_pos"))
        restore_rng(payload["rng"])
        # one-off seconds of the run before the checkpoint (a resumed run does not redo them)
        self.strategy.__dict__["oneoff_times"] = dict(state.get("oneoff_times") or {})
        keys = ("epoch", "history", "best_val", "best_epoch", "best_state", "step", "elapsed_s")
        return {k: state[k] for k in keys}

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, resume: dict[str, Any] | None = None) -> TrainResult:
        """Train; ``resume`` (a :class:`CellCheckpoint` payload) continues after its epoch."""
        t_start = time.perf_counter()
        if self.settings.deterministic:
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
        else:  # a fresh run: the strategy may look at the (un-augmented) data first
            self.strategy.before_fit(FitData(train=self._bn_loader,
                                             val=self._eval_loaders["val"],
                                             loss_fn=self.loss_fn, autocast=self.autocast))
        n = self.settings.log_every_n_steps
        kill_at = kill_point()  # fault injection (tests): kill -9 mid-epoch at a known batch
        for epoch in range(first_epoch, self.settings.epochs):
            t0 = time.perf_counter()
            oneoff_before = self.strategy.oneoff_total()
            if epoch in self.settings.lr_milestones:  # resume: the optimizer state holds the lr
                for g in self.optimizer.param_groups:
                    g["lr"] *= self.settings.lr_gamma
            self.strategy.on_epoch_start(epoch)
            self.strategy.set_train_mode(self.model)
            loss_sum = torch.zeros((), device=self.device)
            n_batches = 0
            step_values: list[tuple[int, dict[str, torch.Tensor]]] = []
            for x, y in self.train_loader:
                loss = self.train_step(x, y, epoch=epoch, step=step)
                loss_sum += loss.float()
                self.strategy.after_step(loss)
                if per_step := self.strategy.step_values():
                    step_values.append((step, per_step))
                n_batches += 1
                step += 1
                if kill_at is not None and kill_at == (epoch, n_batches):
                    kill_now()
                if n and step % n == 0:
                    values = self.strategy.log_values()
                    for cb in self.callbacks:
                        cb.on_log_step(step, values)
            train_loss = float(loss_sum) / max(n_batches, 1)  # the epoch's one sync
            check_finite(epoch, {"train_loss": train_loss})
            self._send_step_values(step_values)
            self._epoch = epoch
            val = self._evaluate_val()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            record = {
                "train_loss": train_loss,
                **{f"val_{k}": v for k, v in val.items()},
                # the strategy's one-off work inside the epoch (DELTA's attention) is its own cost
                "epoch_time_s": time.perf_counter() - t0
                - (self.strategy.oneoff_total() - oneoff_before),
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
        # the last epoch's weights (BatchNorm recalibrated by its validation pass), once
        last_test = self._test()[0] if self.settings.evaluate_test else {}
        self.model.load_state_dict(best_state)
        # the strategy's last word on the selected weights (LoRA merges, WiSE-FT interpolates);
        # new validation numbers replace the checkpoint's: best_val is the tested model's
        end_val = self.strategy.on_train_end(EndContext(
            model=self.model, evaluate_val=self._evaluate_val,
            selection_metric=self.settings.selection_metric, best_val=dict(best_val),
            evaluate_val_as_is=lambda: self.evaluate("val")))
        if end_val is not None:
            best_val = end_val
        test, predictions = self._test() if self.settings.evaluate_test else ({}, None)
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
            n_trainable_params=self.n_trainable_params,
            start_state=self._start,
            test_predictions=predictions,
            meta_source=self.strategy.meta_source or "none",
            meta_reference=getattr(self.strategy, "meta_reference", None) or "none",
            final_state=self.model.state_dict(),
            end_val=dict(end_val) if end_val is not None else None,
            oneoff_times=dict(self.strategy.__dict__.get("oneoff_times", {})),
            last_test=last_test,
        )

    def _send_step_values(self, logged: list[tuple[int, dict[str, torch.Tensor]]]) -> None:
        """The epoch's per-step strategy values, read from the device in one go, to the
        callbacks."""
        if not logged:
            return
        flat = torch.stack([t.detach().float().reshape(())
                            for _, values in logged for t in values.values()]).tolist()
        i = 0
        for step, values in logged:
            row = dict(zip(values, flat[i:i + len(values)], strict=True))
            i += len(values)
            for cb in self.callbacks:
                cb.on_step_values(step, row)

    def _evaluate_val(self) -> dict[str, float]:
        """Validation numbers of the current weights, measured as every epoch's are."""
        if self.settings.precise_bn:
            self.recalibrate_bn()
        return self.evaluate("val")

    def _test(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        """The only read of the test split: once, on the selected checkpoint. Returns its
        metrics and its predictions table (for the run's artifact: pooled CV reports)."""
        loss, y, scores = self.predict("test")
        metrics = {"loss": loss, **compute_metrics(self.bundle.task, y, scores)}
        return metrics, predictions_table(y, scores, self.bundle.class_names)

    def drift(self) -> dict[str, float]:
        """Per layer group: ||θ − θ_pretrained|| / ||θ_pretrained|| over its parameters."""
        now = dict(self.model.named_parameters())
        out = {}
        for g in self.groups:
            num = sum(float((now[p].detach() - self._start[p]).pow(2).sum()) for p in g.params)
            den = sum(float(self._start[p].pow(2).sum()) for p in g.params)
            out[g.name] = math.sqrt(num) / math.sqrt(den) if den > 0 else 0.0
        return out


