"""The strategy interface (small on purpose) and the name registry.

A strategy gets the model, its ordered layer groups (:func:`layer_groups`) and the base
settings, and may

1. build the optimizer's parameter groups (freeze, per-group LR)        -> ``param_groups``
2. add a term to the loss (L2-SP)                                        -> ``loss_term``
3. replace the single training step (MetaLR: look-ahead, LR update, step) -> ``train_step``
4. change the selected weights once training ends (LoRA: merge; WiSE-FT)   -> ``on_train_end``

Small hooks besides: ``before_fit`` (the un-augmented training and validation loaders, once
before the first epoch: the linear probe), ``after_step`` (each step's task loss: a penalty's
share of the loss), ``step_values`` (numbers logged at every training step: DELTA's penalty).
Everything else (epochs, evaluation, checkpoint selection, logging, timing) is the trainer's,
so every strategy is measured by the same loop. A strategy reports what it wants logged as
plain numbers (``log_values``); it never talks to MLflow.

Parameters are a pydantic model (``Params``) so the config rejects a bad value with the field
name and the allowed range; ``test_params`` are tiny settings for the test-suite (benchopt's
idea); ``search_space`` is what the tuner may search (:mod:`.space`), and ``constrain_space``
narrows it to the configurations the strategy accepts given its untuned parameters (MetaLR: an
``lr`` whose initial rates lie inside its bounds); ``default_rank`` puts the
strategy in the quick benchmark's default grid; ``measured_cost_share`` tells the cost plan how
a configuration scales the step time measured at the defaults. A strategy is one file: the
class, decorated with :func:`register`, declares all of it (see docs/architecture.md, "Add a
strategy in one file").
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from metalr_bench.strategies.core.layers import LayerGroup, modules_of
from metalr_bench.strategies.core.optim import create_optimizer
from metalr_bench.strategies.core.space import LR, SearchDim
from pydantic import BaseModel, ConfigDict
from torch import nn


class SpaceError(ValueError):
    """A search space with no valid configuration; ``name`` is the dimension or parameter to
    change (the tuner reports it as ``tune.params.<strategy>.<name>`` when the config set it)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TrainSettings:
    """The base settings every strategy shares (from the config)."""

    lr: float = 1e-3
    optimizer: str = "adam"  # a name of the optimizer registry (:mod:`.optim`)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    epochs: int = 5
    steps_per_epoch: int = 1


@dataclass
class StepContext:
    """What a strategy's own ``train_step`` may use; handed over by the trainer each step.

    ``meta_batch`` returns the next batch of the strategy's meta/validation source (MetaLR);
    ``autocast`` is the trainer's mixed-precision context; ``loss_fn(logits, y)`` the task loss;
    ``forward`` the model as the trainer calls it (compiled when ``compile`` is set);
    ``optimizer`` is the strategy's own (``Strategy.optimizer``, which it built and owns), handed
    back for convenience, never a second one.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    autocast: Callable[[], AbstractContextManager[Any]]
    epoch: int
    step: int
    meta_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    #: the trainer's forward: ``model``, or ``torch.compile(model)`` with its ``compile`` option
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    compile: bool = False


@dataclass(frozen=True)
class FitData:
    """What the trainer hands a strategy once, before the first epoch (:meth:`Strategy.before_fit`).

    ``train`` and ``val`` are loaders of ``(images, labels)`` batches on the training device,
    normalised as the model sees them, un-augmented and in a fixed order: ``train`` the images
    the run trains on, ``val`` the validation split (the split that also selects every
    strategy's checkpoint; never the test split). Iterating a loader again yields the same
    batches. ``loss_fn(logits, y)`` is the task loss, ``autocast`` the trainer's mixed-precision
    context. Why a hook: a strategy that needs the data before training (LP-FT's probe, the
    linear probe) gets it without knowing the datasets package.
    """

    train: Iterable[tuple[torch.Tensor, torch.Tensor]]
    val: Iterable[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    autocast: Callable[[], AbstractContextManager[Any]]


@dataclass
class EndContext:
    """What a strategy's ``on_train_end`` may use; handed over by the trainer once, after the
    last epoch, with the selected checkpoint loaded into ``model`` and before the test split is
    read.

    ``evaluate_val()`` measures the validation loss and metrics of ``model``'s current weights
    exactly as every epoch's were measured (the trainer's PreciseBN re-estimation first, when it
    uses it); ``selection_metric`` is the metric checkpoints were selected by (higher is better;
    the loss breaks ties); ``best_val`` the selected checkpoint's validation numbers.
    ``evaluate_val_as_is()`` measures them without re-estimating BatchNorm statistics: for
    weights whose statistics belong to them already (WiSE-FT's α = 0, the starting model).
    """

    model: nn.Module
    evaluate_val: Callable[[], dict[str, float]]
    selection_metric: str
    best_val: dict[str, float]
    evaluate_val_as_is: Callable[[], dict[str, float]] | None = None


class Strategy:
    """Base class: plain fine-tuning of every parameter with one learning rate."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    test_params: ClassVar[list[dict[str, Any]]] = [{}]
    #: what the tuner searches: ``lr`` (the config's base LR) and/or fields of ``Params``
    search_space: ClassVar[dict[str, SearchDim]] = {"lr": LR}
    #: position in the quick benchmark's default grid; None: only when a config names it
    default_rank: ClassVar[int | None] = None
    #: one line for `run-benchmark list` (default: the first line of the class docstring)
    description: ClassVar[str] = ""
    #: where ``StepContext.meta_batch`` should draw from, or None when not needed
    meta_source: ClassVar[str | None] = None
    #: images per meta batch; None: the training batch size
    meta_batch_size: int | None = None
    #: the key of ``log_values()`` (logged every epoch) that shows this strategy's mechanism
    #: acted, e.g. ``"l2sp/penalty_share"``, ``"lr_spread"``, ``"trainable_share"``; the run
    #: logs it as the tag ``mechanism`` and the report's "Did each strategy act?" table reads
    #: that metric's first and last value. None: nothing beyond plain fine-tuning to show.
    mechanism: ClassVar[str | None] = None
    #: False: the strategy trains the architecture from its random initialisation (``scratch``):
    #: the cell builder then does not load the starting weights (the model is the zoo's own
    #: initialisation under the cell's seed), and the run logs neither drift nor
    #: transferability, which both measure the distance from pre-trained weights
    pretrained_start: ClassVar[bool] = True
    #: params that change what the method is (BitFit's ``train_norm_scale``): shown in the
    #: row's label also when the cell is tuned (``bitfit(train_norm_scale=True,tuned)``), where
    #: other params are hidden behind ``(tuned)``
    label_params: ClassVar[tuple[str, ...]] = ()
    #: the strategy this one is the control of (``discriminative``: ``metalr``, the same
    #: method without its learned rates): in one tuned grid with both, the control gets no
    #: study of its own and runs at that strategy's tuned parameters, so the paired difference
    #: measures only what the other strategy adds
    controls: ClassVar[str | None] = None

    def __init__(
        self,
        params: BaseModel | dict[str, Any] | None,
        model: nn.Module,
        groups: list[LayerGroup],
        settings: TrainSettings,
    ) -> None:
        if not isinstance(params, BaseModel):
            params = self.Params(**(params or {}))
        self.params = params
        self.model = model
        self.groups = groups
        self.settings = settings
        self.optimizer: torch.optim.Optimizer | None = None
        #: modules of frozen groups, kept in eval mode by ``set_train_mode`` (see ``freeze``)
        self._frozen_modules: list[nn.Module] = []

    @classmethod
    def measured_cost_share(cls, params: BaseModel, batch_size: int) -> float:
        """The share of its extra step time over full fine-tuning (measured by bench_throughput
        at default parameters) that this configuration pays: 1.0, as measured. A strategy whose
        parameters change its cost (MetaLR's meta interval and meta batch) overrides it; the
        cost plan (``run-benchmark plan``) interpolates with it."""
        return 1.0

    @classmethod
    def constrain_space(
        cls, space: dict[str, SearchDim], fixed: dict[str, Any]
    ) -> dict[str, SearchDim]:
        """Narrow ``space`` (resolved: no ``"groups"`` bound left) so that every point of it is a
        configuration this strategy accepts, given ``fixed``: the untuned parameters as the
        config gives them (defaults not filled in), plus ``lr``, the config's base LR, when
        ``lr`` is not searched and the caller knows it. Return a space with the same names,
        each range inside the given one (the tuner refuses a ``tune.params`` override that had
        to be narrowed); raise :class:`SpaceError` naming the culprit when nothing is left.
        Default: every point is valid, the space is returned as is."""
        return space

    @classmethod
    def describe(cls) -> str:
        """One line for `run-benchmark list`."""
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        return cls.description or (doc[0] if doc else cls.name)

    # -- 1. parameter groups / optimizer ------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; the default puts every layer group at the base LR."""
        return [self._group(i, lr=self.settings.lr) for i in range(len(self.groups))]

    def _group(self, index: int, **options: Any) -> dict[str, Any]:
        named = dict(self.model.named_parameters())
        g = self.groups[index]
        return {"params": [named[p] for p in g.params], "name": g.name, **options}

    def build_optimizer(self) -> torch.optim.Optimizer:
        groups = [g for g in self.param_groups() if g["params"]]
        if not groups:
            raise ValueError(f"strategy {self.name!r} left no trainable parameter")
        self.optimizer = create_optimizer(groups, self.settings, self.settings.optimizer)
        return self.optimizer

    # -- 2. loss term ---------------------------------------------------------------------------
    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term added to the task loss (None: nothing)."""
        return None

    # -- 3. the training step -------------------------------------------------------------------
    @staticmethod
    def forward_backward(ctx: StepContext, batch: tuple[torch.Tensor, torch.Tensor]
                         ) -> torch.Tensor:
        """The first half of the trainer's step for a strategy that owns the rest: zero the
        gradients, the task loss through the trainer's (possibly compiled) forward under its
        autocast, backward; returns the loss (``.grad`` now holds the training gradient)."""
        x, y = batch
        ctx.optimizer.zero_grad(set_to_none=True)
        # `is None`, not `or`: truth-testing a compiled ResNet calls len(), which raises
        forward = ctx.model if ctx.forward is None else ctx.forward
        with ctx.autocast():
            loss = ctx.loss_fn(forward(x), y)
        loss.backward()
        return loss

    def train_step(
        self, ctx: StepContext, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor | None:
        """Replace the trainer's step and return the (detached) training loss; None: default."""
        return None

    # -- hooks ----------------------------------------------------------------------------------
    def freeze(self, frozen: list[LayerGroup]) -> None:
        """Freeze the ``frozen`` layer groups, the way every selective strategy does: their
        parameters get ``requires_grad=False`` (no gradient, so no optimizer, weight decay
        included, moves them) and :meth:`set_train_mode` keeps their modules in eval mode, so
        their BatchNorm statistics, like their weights, stay the pre-trained ones. Every other
        parameter trains."""
        names = {p for g in frozen for p in g.params}
        for name, p in self.model.named_parameters():
            p.requires_grad_(name not in names)
        self._frozen_modules = [m for g in frozen for m in modules_of(self.model, g)]

    def set_train_mode(self, model: nn.Module) -> None:
        """Put ``model`` in training mode, the modules of frozen groups (``freeze``) in eval."""
        model.train()
        for module in self._frozen_modules:
            module.eval()

    @contextmanager
    def one_off(self, name: str) -> Iterator[None]:
        """Time a piece of work the strategy does once per run, not per epoch (a probe fit,
        WiSE-FT's α sweep, DELTA's attention pass, a pre-training of its own), as
        ``oneoff_times[name]`` in seconds. The trainer logs them (``oneoff_time_s`` and
        ``oneoff_time_s/<name>``), keeps them out of the epoch's ``epoch_time_s``, and the
        report's cost adds them to a run's cost: the user pays them once per run. On CUDA the
        device is synchronised at both ends, so queued kernels count where they ran."""
        times = self.__dict__.setdefault("oneoff_times", {})
        cuda = next((p.device for p in self.model.parameters() if p.is_cuda), None)
        if cuda is not None:
            torch.cuda.synchronize(cuda)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda is not None:
                torch.cuda.synchronize(cuda)
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0

    def oneoff_total(self) -> float:
        """Seconds of one-off work so far (:meth:`one_off`)."""
        return float(sum(self.__dict__.get("oneoff_times", {}).values()))

    def before_fit(self, data: FitData) -> None:  # noqa: B027
        """Called once by the trainer before the first epoch of a fresh run (not on resume: what
        it computes belongs in :meth:`state_dict`, or in the model's weights, which the
        checkpoint restores), with the un-augmented training and validation loaders."""

    def on_epoch_start(self, epoch: int) -> None:  # noqa: B027
        """Called before each epoch (0-based)."""

    def after_step(self, loss: torch.Tensor) -> None:  # noqa: B027
        """Called by the trainer's loop after every training step with the step's detached task
        loss (a device tensor: accumulate it, never read it here, so the hot loop never waits
        for the GPU). The regularisers use it for their penalty's share of the loss."""

    def step_values(self) -> dict[str, torch.Tensor]:
        """Values of the training step just taken, logged at *every* step under their own key
        (MLflow step = the training step; step 0 is the step before the first update): 0-d
        detached device tensors. The trainer keeps them and reads them once per epoch, so the
        hot loop never syncs. Default: none (DELTA logs its penalty and task loss)."""
        return {}


    def on_train_end(self, ctx: EndContext) -> dict[str, float] | None:
        """Called once after the last epoch, the selected checkpoint loaded, before the test
        evaluation: a strategy whose final model is not the selected checkpoint itself changes
        ``ctx.model`` here (LoRA merges its adapters into the base weights; WiSE-FT interpolates
        towards the starting weights). Return the validation numbers of the weights it leaves
        (they replace ``best_val`` in the result: the numbers of the model that is tested, and
        the tuning objective reads them, ``studies.objective_value``),
        or None when the model computes the same function as before (nothing to re-measure).
        The model must keep the architecture's parameter names from here on (drift, the
        transferability metrics and :meth:`start_state` compare by name)."""
        return None

    def start_state(self) -> dict[str, torch.Tensor]:
        """A copy of the weights the run starts from, named as in the model the trainer hands
        back after :meth:`on_train_end` (drift and transferability compare the two by name);
        the trainer takes it once, when it is built. Default: the model's state dict now. A
        strategy that wraps modules (LoRA) maps its names back to the architecture's."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def log_values(self) -> dict[str, float]:
        """Numbers to log each epoch; by default each group's learning rate (``lr/<group>``)
        and their spread (``lr_spread``, :func:`lr_spread`)."""
        if self.optimizer is None:
            return {}
        rates = {f"lr/{g.get('name', i)}": float(g["lr"])
                 for i, g in enumerate(self.optimizer.param_groups)}
        return rates | lr_spread(rates.values())

    def artifacts(self) -> dict[str, Any]:
        """Files to log with the run after training, ``{path: matplotlib figure}`` (MetaLR: its
        LR curves); drawn once per final run by ``train_cell``. Default: none."""
        return {}

    def final_values(self) -> dict[str, float]:
        """Numbers to log once, with the run's final metrics (WiSE-FT: the chosen α and the
        validation curve over α); default: none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Strategy state beyond the optimizer's, for exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def lr_spread(rates: Any) -> dict[str, float]:
    """``{"lr_spread": max/min}`` over the positive per-group rates (a frozen group's 0 and a
    rate a hyper-gradient drove to or below 0 would make the ratio meaningless); 1.0 means every
    group trains at one rate, i.e. no layer-wise LR at all. Empty when no rate is positive."""
    positive = [float(r) for r in rates if float(r) > 0]
    return {"lr_spread": max(positive) / min(positive)} if positive else {}


def trainable_values(model: nn.Module) -> dict[str, float]:
    """``trainable_params`` (parameter elements that get a gradient) and ``trainable_share``
    (their share of all the model's parameter elements): what a selective strategy logs to show
    how much of the network it trains."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": float(trained), "trainable_share": trained / max(total, 1)}


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available by ``cls.name`` in configs and the CLI."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    known = STRATEGIES.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"strategy name {cls.name!r} is taken by {known.__module__}."
                         f"{known.__qualname__}; pick another `name` for {cls.__qualname__}")
    STRATEGIES[cls.name] = cls
    return cls
