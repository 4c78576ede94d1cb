"""Discriminative learning rates: MetaLR's starting rates, held fixed; the control for MetaLR.

The classic transfer-learning baseline "a smaller learning rate for the pre-trained layers"
(e.g. Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification", ACL 2018,
their "discriminative fine-tuning"), set up exactly as MetaLR starts
(:mod:`metalr_bench.strategies.metalr`): backbone_lr_scale·lr (0.1·lr) for every backbone group,
lr for the head (:func:`~metalr_bench.strategies.metalr.initial_rates`), the head pinned to lr
for the same first share of the run (``head_pin_fraction``, 1/6 by default; a no-op here since
the head's rate is lr anyway, kept so the ``head_pinned`` metric and params match MetaLR's), the
same real optimizer with the rates as device tensors, and no hyper-gradient: no meta batch, no
look-ahead, the rates never move.

Why: MetaLR starts from a fixed backbone/head ratio and then learns the rates. Untuned,
"metalr vs full" mostly compares that starting ratio with one LR; "metalr vs discriminative" is
the gain that learning the rates buys. It is MetaLR with the meta-step removed (this class
inherits MetaLR's optimizer, pin and logging), so ``metalr`` with ``hyper_lr: 0`` ends with
weights bit-identical to this strategy's on the same seed (the meta batches come from their own
loader and generator, and the look-ahead writes only scratch buffers). Tuned in one grid with
``metalr``, it has no study of its own: it runs at metalr's tuned parameters (``tuned_from``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from metalr_bench.strategies.core.base import register
from metalr_bench.strategies.core.space import SearchDim
from metalr_bench.strategies.metalr import PUBLIC_HEAD_PIN_FRACTION, MetaLR, MetaLRParams
from pydantic import BaseModel, ConfigDict, Field, model_validator

_DEFAULTS = MetaLRParams()


class DiscriminativeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backbone_lr_scale: float = Field(0.1, gt=0, description="backbone LR = scale · lr (head: "
                                     "lr), MetaLR's starting rates")
    head_pin_fraction: float = Field(
        PUBLIC_HEAD_PIN_FRACTION, ge=0, le=1,
        description="as MetaLR's: the head's LR is lr for the first ⌈fraction·epochs⌉ epochs "
        "(it stays lr afterwards too: nothing moves it)",
    )
    head_pin_epochs: int | None = Field(None, ge=0, description="as MetaLR's: a count instead "
                                        "of head_pin_fraction")
    optimizer: Literal["adam", "adamw", "sgd"] | None = Field(
        None, description="real optimizer; default: the benchmark's setting"
    )

    # what MetaLR reads; no meta-step runs, the bounds check the starting rates as MetaLR does
    hyper_lr: ClassVar[float] = 0.0
    update: ClassVar[str] = "multiplicative"
    lr_min: ClassVar[float] = _DEFAULTS.lr_min
    lr_max: ClassVar[float] = _DEFAULTS.lr_max
    meta_interval: ClassVar[int] = 1
    meta_source: ClassVar[str | None] = None
    meta_batch_size: ClassVar[int | None] = None

    @model_validator(mode="after")
    def _consistent(self) -> DiscriminativeParams:
        if self.head_pin_epochs is not None and "head_pin_fraction" in self.model_fields_set:
            raise ValueError("set head_pin_fraction (a share of the run) or head_pin_epochs "
                             "(a count), not both")
        return self


@register
class Discriminative(MetaLR):
    """Discriminative LRs: MetaLR's starting rates (0.1·lr backbone, lr head), never learned."""

    name = "discriminative"
    Params = DiscriminativeParams
    test_params = [{}, {"backbone_lr_scale": 0.5, "head_pin_epochs": 1}]
    meta_source = None  # no meta batches
    learns_rates = False
    #: MetaLR's search space and budget, less hyper_lr (nothing is learned)
    search_space = {"lr": SearchDim("float", 1e-5, 1e-2, log=True)}
    default_rank = 5  # right after metalr in the default grid: its control
    controls = "metalr"  # tuned alongside it, it runs at metalr's tuned parameters

    @classmethod
    def constrain_space(
        cls, space: dict[str, SearchDim], fixed: dict[str, Any]
    ) -> dict[str, SearchDim]:
        """MetaLR's narrowing of lr, with its default bounds (the starting rates must be rates
        MetaLR could start from, so both search the same lr range)."""
        return MetaLR.constrain_space(space, {"lr_min": _DEFAULTS.lr_min,
                                              "lr_max": _DEFAULTS.lr_max, **fixed})

    @classmethod
    def measured_cost_share(cls, params: BaseModel, batch_size: int) -> float:
        """No meta-step: the step time is full fine-tuning's, as measured."""
        return 1.0
