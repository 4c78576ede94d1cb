"""Name -> adapter registry, so the config can validate names and the runner can load them.

Adapters are found like strategies: every module of the ``metalr_bench.datasets`` package, and
every entry point in the group ``metalr_bench.datasets`` (a user's package adds a dataset
without touching this one); nothing lists adapter names. Discovery runs once, lazily.

An adapter is a function ``(root, size, seed, download, allow_md5_mismatch, **options)`` that
returns a :class:`DatasetBundle`. Its ``options`` (a pydantic model, the config entry's
``options:``) validate the adapter's own loading settings so a typo in the config is reported with
the field name, not deep inside a loader. A dataset's *options* are never tuned; a strategy's
tunable hyper-parameters are its *params* (``Strategy.Params``), one word per idea.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metalr_bench.datasets.core.base import DatasetBundle
from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Callable[..., DatasetBundle]
    #: the pydantic model of the adapter's ``options:`` (renamed in issue 40, see register_dataset)
    options: type[BaseModel]
    description: str
    #: ``(root, options) -> str | None``: how a dataset of this adapter is named by default
    #: (imagefolder/csv: the root folder's name); None or returning None: the adapter's name
    naming: Callable[[Path | None, dict[str, Any]], str | None] | None = None

    def default_name(self, root: str | Path | None, options: dict[str, Any]) -> str:
        """The name runs, tags, leaderboards and reports use when the config gives none."""
        named = self.naming(Path(root) if root else None, options) if self.naming else None
        return named or self.name


DATASETS: dict[str, DatasetEntry] = {}

#: entry-point group a third-party package declares its adapter modules under
ENTRY_POINT_GROUP = "metalr_bench.datasets"
_discovered = False


def register_dataset(
    name: str, *, options: type[BaseModel] = NoOptions, description: str = "",
    naming: Callable[[Path | None, dict[str, Any]], str | None] | None = None,
    options_model: type[BaseModel] | None = None,
) -> Callable[[Callable[..., DatasetBundle]], Callable[..., DatasetBundle]]:
    """Register the decorated function as adapter ``name``; ``options`` validates its config
    ``options:``. ``options_model`` is the keyword's name before issue 40, accepted for one
    release with a DeprecationWarning (a user's adapter package keeps loading meanwhile)."""
    if options_model is not None:
        if options is not NoOptions:
            raise TypeError(f"register_dataset({name!r}): give `options=` only "
                            "(`options_model=` is its deprecated spelling)")
        import warnings

        warnings.warn(f"register_dataset({name!r}, options_model=...) is deprecated; write "
                      "`options=` (removed in the next release)", DeprecationWarning,
                      stacklevel=2)
        options = options_model

    def deco(fn: Callable[..., DatasetBundle]) -> Callable[..., DatasetBundle]:
        DATASETS[name] = DatasetEntry(name, fn, options, description or (fn.__doc__ or ""),
                                      naming)
        return fn

    return deco


def _ensure_loaded(*, refresh: bool = False) -> None:
    """Import every adapter module (package scan, then entry points) once."""
    global _discovered
    if _discovered and not refresh:
        return
    import metalr_bench.datasets as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    _discovered = True


def available_datasets() -> list[str]:
    _ensure_loaded()
    return sorted(DATASETS)


def get_entry(name: str) -> DatasetEntry:
    _ensure_loaded()
    if name not in DATASETS:
        raise KeyError(
            f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}"
        )
    return DATASETS[name]


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    size: int = 28,
    seed: int = 0,
    download: bool = False,
    allow_md5_mismatch: bool = False,
    options: dict[str, Any] | None = None,
) -> DatasetBundle:
    """Load dataset ``name``; ``options`` are validated by the adapter's ``options`` model."""
    entry = get_entry(name)
    opts = entry.options(**(options or {}))
    return entry.loader(
        root=Path(root) if root is not None else None,
        size=size,
        seed=seed,
        download=download,
        allow_md5_mismatch=allow_md5_mismatch,
        **opts.model_dump(),
    )
