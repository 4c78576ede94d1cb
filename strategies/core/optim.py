"""The optimizer registry: every optimizer a config may name, defined once (timm's
``optim/_optim_factory.py`` idea).

Why one place: the strategy base class, MetaLR and HD each had their own adam/adamw/sgd
if-chain, and the config its own list of names; a fourth optimizer meant four edits and a
missed one failed only at run time. Here a name maps to a factory; :func:`create_optimizer`
builds it from parameter groups and the base settings (``TrainSettings``: ``lr``,
``weight_decay``, ``momentum``), the config's and the strategies' choices are
:func:`optimizer_names`, and a bad name is refused with the list.

Imports torch only inside the factories, so the config can check a name without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import AfterValidator

if TYPE_CHECKING:
    import torch


class OptimizerSettings(Protocol):
    """What a factory reads (``strategies.core.base.TrainSettings`` has it)."""

    lr: float
    weight_decay: float
    momentum: float


#: ``factory(param_groups, settings, **extra) -> optimizer``; ``extra`` are keyword arguments
#: of the torch optimizer itself (``fused``, ``foreach``)
OptimizerFactory = Callable[..., "torch.optim.Optimizer"]


def _adam(groups: list[dict[str, Any]], s: OptimizerSettings, **extra: Any
          ) -> torch.optim.Optimizer:
    import torch

    return torch.optim.Adam(groups, lr=s.lr, weight_decay=s.weight_decay, **extra)


def _adamw(groups: list[dict[str, Any]], s: OptimizerSettings, **extra: Any
           ) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay, **extra)


def _sgd(groups: list[dict[str, Any]], s: OptimizerSettings, **extra: Any
         ) -> torch.optim.Optimizer:
    import torch

    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                           **extra)


#: name -> factory; Adam and AdamW take ``weight_decay`` (coupled / decoupled), SGD also
#: ``momentum`` (classical, PyTorch's form)
OPTIMIZERS: dict[str, OptimizerFactory] = {"adam": _adam, "adamw": _adamw, "sgd": _sgd}


def optimizer_names() -> tuple[str, ...]:
    """The names a config (``optimizer``) and a strategy's ``optimizer`` param may use."""
    return tuple(OPTIMIZERS)


def check_optimizer(name: str) -> str:
    """``name`` when registered (case-insensitive, returned lower-case), else a ValueError
    listing the choices."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of "
                         f"{', '.join(optimizer_names())}")
    return key


#: a pydantic field type for an optimizer name, checked against the registry
OptimizerName = Annotated[str, AfterValidator(check_optimizer)]


def create_optimizer(groups: list[dict[str, Any]], settings: OptimizerSettings,
                     name: str, **extra: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``groups`` (torch parameter groups, each may set its own
    ``lr``) with the base ``settings``; ``extra`` goes to the torch optimizer."""
    return OPTIMIZERS[check_optimizer(name)](groups, settings, **extra)
