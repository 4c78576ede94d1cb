"""MetaLR as the public code runs it, defects included (Schuture/MetaLR, ``MetaLR_POCUS/``).

Reference: Chen et al., "MetaLR: Meta-tuning of Learning Rates for Transfer Learning in Medical
Imaging", MICCAI 2023 (arXiv:2206.01408); code: github.com/Schuture/MetaLR,
``MetaLR_POCUS/train.py`` (``train_meta_step``) and ``MetaLR_POCUS/meta.py``
(``MetaSGD.meta_step``).

``metalr`` (:mod:`metalr_bench.strategies.metalr`) fixes two defects of that code; this strategy
keeps them, so the benchmark can measure what they cost:

1. **The look-ahead ascends.** ``MetaSGD.meta_step`` sets each parameter to
   ``parameter.sub(-lrs[j] * grad)``, i.e. θ̂ = θ + α·g instead of eq. 1's θ − α·g, and the
   code differentiates the meta loss at that point: h_j = ∂L_val(θ + α·g)/∂α_j.
2. **The meta batch is always the first training batch.** ``train_meta_step`` reads
   ``next(meta_iterator)`` from a local name that never exists, the bare ``except`` re-creates
   ``iter(meta_loader)`` on every call, and ``meta_loader`` is the training folds with the
   un-augmented transform and ``shuffle=False``: every meta-step validates on the same first
   batch (training batch size) of the un-shuffled training set. Here: meta source ``first``,
   the trainer's first batch of the training split in its stored order, un-augmented.

Everything else is the public code's too, and fixed: the multiplicative update
α ← clip(α·(1 − η·h), 1e-6, 1e-2) with the raw h and η = ``hyper_lr`` (0.1, the code's
``--hyper-lr``), initial rates 0.1·lr (backbone groups) and lr (head), the head's rate pinned to
lr for the first 5 epochs whatever the run's length (``if epoch <= 5`` with 1-based epochs, in a
run of 30: ``metalr`` pins the same share, 1/6, of any run; here, as in the code, a run of 5
epochs or fewer never learns the head's rate: its ``head_pinned`` metric stays 1), a meta-step
every iteration,
the real step being the optimizer (Adam with weight decay in the code; the benchmark's optimizer
here, Adam with weight decay 1e-4 by default) with the new α as each group's rate. The code runs
a second forward/backward of the training batch for that step; here g is reused: the same
weights and batch give the same gradient, and BatchNorm's running statistics are updated once
in both (the code's look-ahead runs on its throw-away ``meta_model``, ours on scratch buffers).

**The sign, derived.** :func:`~metalr_bench.strategies.core.hypergrad.hypergradient` called with
rates a forms θ̂ = θ − a·g and returns H(a)_j = ∂L_val(θ − a·g)/∂a_j = −⟨∇_j L_val(θ − a·g), g_j⟩.
The code's point is θ + α·g = θ − (−α)·g, and by the chain rule

    h_j = ∂L_val(θ + α·g)/∂α_j = −H(−α)_j = +⟨∇_j L_val(θ + α·g), g_j⟩,

so this strategy calls ``hypergradient`` with −α (the look-ahead moves the other way) and
negates the result. ``metalr``'s h is H(α) = −⟨∇_j L_val(θ − α·g), g_j⟩: the two differ in
sign, and in the point where the meta gradient is taken (±α·g, a difference of order α·‖g‖).
When the training and meta gradients agree (⟨∇L_val, g⟩ > 0, the usual case, the more so with a
meta batch of training images), ``metalr`` raises a rate and the public code lowers it by the
factor 1 − η·h; it raises a rate only where the two gradients disagree. The logged
``meta_loss`` is L_val at the ascended point θ + α·g, as in the code.

Parameters beyond the code, for attributing the cost (defaults: the code's behaviour):
``ascent: false`` descends as in the paper, ``meta_source: train`` draws fresh training batches;
with both, the strategy is ``metalr`` with ``head_pin_epochs: 5`` (``metalr`` pins a share
of the run).

Deviation, and why: no ResNet is rebuilt and no state dict is reloaded per iteration (the code
builds a new ``meta_model`` each step and differentiates through a second-order graph); the
hyper-gradient is the same exact first-order one, g does not depend on α, so this changes only
the time. Choices the code makes outside the method are the benchmark's, as for every strategy:
the data and input pipeline, the starting weights, and model selection on the validation split
(the code picks the best epoch on its test fold).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from metalr_bench.strategies.core.base import StepContext, register
from metalr_bench.strategies.core.hypergrad import Lookahead, hypergradient, update_rates
from metalr_bench.strategies.core.space import SearchDim
from metalr_bench.strategies.metalr import MetaLR
from pydantic import BaseModel, ConfigDict, Field

#: the public code's constants (``train.py``), fixed here
PUBLIC = {"lr_min": 1e-6, "lr_max": 1e-2, "backbone_lr_scale": 0.1}


class MetaLRPublicParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyper_lr: float = Field(0.1, gt=0, lt=10, description="η of α·(1 − η·h) (the code's "
                            "--hyper-lr); below 10, else α·(1 − η·h) flips sign for |h| > 1/η")
    ascent: bool = Field(True, description="true: the code's look-ahead θ + α·g; false: the "
                         "paper's θ − α·g (isolates the cost of the sign)")
    meta_source: Literal["first", "train"] = Field(
        "first", description="first: the code's meta batch, always the first un-shuffled "
        "training batch; train: a fresh training batch each step (isolates that cost)",
    )

    # what MetaLR reads and the public code hard-codes
    update: ClassVar[str] = "multiplicative"
    lr_min: ClassVar[float] = PUBLIC["lr_min"]
    lr_max: ClassVar[float] = PUBLIC["lr_max"]
    backbone_lr_scale: ClassVar[float] = PUBLIC["backbone_lr_scale"]
    meta_interval: ClassVar[int] = 1
    meta_batch_size: ClassVar[int | None] = None  # the training batch size
    head_pin_epochs: ClassVar[int] = 5  # the code's absolute count, not a share of the run
    head_pin_fraction: ClassVar[float | None] = None
    optimizer: ClassVar[str | None] = None  # the benchmark's (Adam by default, as the code)


@register
class MetaLRPublic(MetaLR):
    """MetaLR as its public code runs it: ascending look-ahead θ + α·g, always the first train batch."""

    name = "metalr_public"
    Params = MetaLRPublicParams
    test_params = [{}, {"ascent": False, "meta_source": "train", "hyper_lr": 0.05}]
    meta_source = "first"  # class default; each instance takes its own from params
    search_space = {"lr": SearchDim("float", 1e-5, 1e-2, log=True),
                    "hyper_lr": SearchDim("float", 1e-3, 1.0, log=True)}
    default_rank = None  # MetaLR's rank is not inherited: only when a config names it

    @classmethod
    def constrain_space(
        cls, space: dict[str, SearchDim], fixed: dict[str, Any]
    ) -> dict[str, SearchDim]:
        """MetaLR's narrowing of lr, with the public code's bounds and backbone scale."""
        return MetaLR.constrain_space(space, {**fixed, **PUBLIC})

    def meta_update(self, ctx: StepContext) -> None:
        """MetaLR's steps 1-2 with the code's look-ahead: h = −H(−α) (module docstring)."""
        if ctx.meta_batch is None:
            raise RuntimeError(
                "metalr_public needs meta batches: run it through the Trainer (which reads "
                "strategy.meta_source) or pass StepContext.meta_batch"
            )
        p: MetaLRPublicParams = self.params
        if self._look is None:
            self._look = Lookahead(self.model, self.groups)
        self._look.use_compile(ctx.compile)
        x_val, y_val = ctx.meta_batch()
        if p.ascent:  # θ̂ = θ − (−α)·g = θ + α·g, and ∂/∂α = −∂/∂(−α)
            h, meta_loss = hypergradient(self._look, -self.alpha, x_val, y_val, ctx.loss_fn,
                                         ctx.autocast)
            h = -h
        else:
            h, meta_loss = hypergradient(self._look, self.alpha, x_val, y_val, ctx.loss_fn,
                                         ctx.autocast)
        new = update_rates(self.alpha, h, rule=p.update, hyper_lr=p.hyper_lr,
                           lr_min=p.lr_min, lr_max=p.lr_max)
        self.alpha.copy_(new)  # in place: the optimizer's LR tensors are views of alpha
        self.hypergrad.copy_(h.to(self.hypergrad.dtype))
        self.meta_loss.copy_(meta_loss.float())
