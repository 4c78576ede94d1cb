"""Meta sources: where a meta-learning strategy's meta batches come from, and what it trains on.

Why here and not in the trainer: the trainer used to hold an if-chain of strategy-specific data
rules (hold 20 % out for ``holdout``, the first batch for ``first``, ...) and its own resumable
generator. Each rule is now a :class:`MetaSource` of :data:`META_SOURCES`, and
:func:`open_meta_source` returns the split the model trains on plus :class:`MetaBatches`, an
endless iterator that keeps its own resume position (``state_dict`` / ``load_state_dict``).
The trainer asks for ``strategy.meta_source`` by name and knows nothing else about it.

The sources (the strategy's ``meta_source``):

* ``train``: the training images themselves, un-augmented, re-shuffled batches (MetaLR's
  default: it trains on every image the baselines get);
* ``holdout``: a patient-grouped, stratified ``fraction`` of the training split held out (the
  model trains on the rest), re-shuffled batches;
* ``fixed``: the same held-out split, always its first shuffled batch;
* ``val``: the validation split (also used for model selection: optimistic scores);
* ``first``: always the first batch of the un-shuffled, un-augmented training split, as the
  public MetaLR code does (it re-creates its iterator each call); nothing is held out.

Seeds and order are the trainer's as before: the holdout is drawn with the run's seed when the
source is opened, the meta loader (seed + 1) is built at the first meta batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from metalr_bench.datasets.core.base import DatasetBundle, Split
from metalr_bench.datasets.core.splits import group_holdout

Batch = tuple[torch.Tensor, torch.Tensor]
#: how batches are drawn from the meta split: re-shuffled passes, one fixed shuffled batch, or
#: the first un-shuffled batch
Draw = Literal["shuffle", "fixed", "first"]


def _whole_train(bundle: DatasetBundle, fraction: float, seed: int) -> tuple[Split, Split]:
    return bundle.train, bundle.train


def _holdout(bundle: DatasetBundle, fraction: float, seed: int) -> tuple[Split, Split]:
    return group_holdout(bundle.train, fraction, seed=seed, stratify=True)


def _val(bundle: DatasetBundle, fraction: float, seed: int) -> tuple[Split, Split]:
    return bundle.train, bundle.val


@dataclass(frozen=True)
class MetaSource:
    """One meta source: ``split(bundle, fraction, seed) -> (train split, meta split)`` and how
    batches are drawn from the meta split."""

    split: Callable[[DatasetBundle, float, int], tuple[Split, Split]]
    draw: Draw


#: name -> source (the module docstring describes each)
META_SOURCES: dict[str, MetaSource] = {
    "train": MetaSource(_whole_train, "shuffle"),
    "holdout": MetaSource(_holdout, "shuffle"),
    "fixed": MetaSource(_holdout, "fixed"),
    "val": MetaSource(_val, "shuffle"),
    "first": MetaSource(_whole_train, "first"),
}


class MetaBatches:
    """Endless meta batches from ``split`` with a resumable position.

    ``shuffle``: passes over a shuffled loader (seed ``seed``), re-shuffled each pass; the
    position is (the loader's RNG state at the start of the current pass, batches drawn in it),
    so a resumed run draws exactly the batches an uninterrupted one would. ``fixed`` and
    ``first`` repeat one batch (no position: a resumed run rebuilds the same batch).
    ``loader(split, batch_size, shuffle=..., seed=..., drop_last=...)`` builds the loaders
    (the trainer's ``make_loader`` with its device and normalisation bound).
    """

    def __init__(self, split: Split, draw: Draw, batch_size: int, seed: int,
                 loader: Callable[..., Any]) -> None:
        self.split, self.draw, self.batch_size, self.seed = split, draw, batch_size, seed
        self._loader = loader
        self._pos: tuple[Any, int] | None = None  # (loader state at pass start, batches drawn)
        self._it = self._batches(None)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return next(self._it)

    def state_dict(self) -> tuple[Any, int] | None:
        """The position to resume from (None: nothing drawn yet, or nothing to remember)."""
        return self._pos

    def load_state_dict(self, state: tuple[Any, int] | None) -> None:
        """Continue after the batches ``state`` says were drawn."""
        if state is None:
            return
        self._pos = state
        self._it = self._batches(state)

    def _batches(self, resume: tuple[Any, int] | None) -> Iterator[Batch]:
        if self.draw == "first":
            first = next(iter(self._loader(self.split, self.batch_size, shuffle=False)))
            while True:
                yield first
        loader = self._loader(self.split, self.batch_size, shuffle=True, seed=self.seed,
                              drop_last=True)
        if self.draw == "fixed":
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
                self._pos = (start, i + 1)
                if i < skip:
                    continue
                yield batch
            skip = 0


@dataclass
class MetaData:
    """What a meta source gives the trainer: the split to train on, and the meta split with its
    batches (both None for a strategy without a meta source)."""

    train: Split
    split: Split | None = None
    batches: MetaBatches | None = None


def meta_source_names() -> tuple[str, ...]:
    return tuple(META_SOURCES)


def open_meta_source(name: str | None, bundle: DatasetBundle, *, fraction: float, seed: int,
                     batch_size: int, loader: Callable[..., Any], owner: str = "") -> MetaData:
    """The meta source ``name`` of ``bundle`` (None: no meta batches, train on everything).

    ``fraction``: the held-out share for ``holdout``/``fixed`` (drawn with ``seed``); the meta
    loader shuffles with ``seed + 1``; ``owner`` names the asking strategy in errors."""
    if name is None:
        return MetaData(bundle.train)
    source = META_SOURCES.get(name)
    if source is None:
        who = f"strategy {owner!r} asks for " if owner else ""
        raise ValueError(f"{who}meta_source={name!r}; expected one of "
                         f"{', '.join(meta_source_names())}")
    train, split = source.split(bundle, fraction, seed)
    return MetaData(train, split, MetaBatches(split, source.draw, batch_size, seed + 1, loader))
