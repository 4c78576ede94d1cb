"""MetaLR as the public code runs it, defects included (Schuture/MetaLR, ``MetaLR_POCUS/``).

Reference: Chen et al., "MetaLR: Meta-tuning of Learning Rates for Transfer Learning in Medical
Imaging", MICCAI 2023 (arXiv:2206.01408); code: github.com/Schuture/MetaLR,
``MetaLR_POCUS/train.py`` (``train_meta_step``) and ``MetaLR_POCUS/meta.py``
(``MetaSGD.meta_step``).

``metalr`` (:mod:`metalr_bench.strategies.metalr`) fixes two defects of that code; this strategy
keeps them, so the benchmark can measure what they cost:

1. **The look-ahead ascends**: θ̂ = θ + α·g, and h_j = ∂L_val(θ + α·g)/∂α_j
   = +⟨∇_j L_val(θ + α·g), g_j⟩ (``hypergradient`` called with −α, negated).
2. **The meta batch is always the first training batch** (meta source ``first``: the first
   batch of the training split in its stored order, un-augmented).

Defaults, the code's: α ← clip(α·(1 − η·h), 1e-6, 1e-2) with the raw h and η = ``hyper_lr`` =
0.1; initial rates 0.1·lr (backbone) and lr (head); the head pinned for the first 5 epochs
whatever the run's length; a meta-step every iteration; the benchmark's optimizer. ``ascent:
false`` and ``meta_source: train`` undo the two defects (then it is ``metalr`` with
``head_pin_epochs: 5``).

Deviation: no model rebuilt per iteration (the same exact first-order hyper-gradient; only the
time changes). The sign derivation and the rest: docs/strategies.md, section ``metalr_public``.
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
