"""The fingerprint of the code a cell's result depends on: part of the cell identity.

Why: ``CODE_VERSION`` ("bump when a change alters results") stayed 0.1.0 through many commits
that changed results, so a re-run after an upgrade skipped cells the old code had computed and
mixed them into one leaderboard. A version someone must remember to bump is never bumped; the
source itself is. The fingerprint is a sha256 over the ``.py`` files a cell's result depends on:

* the strategy's own module(s): every module of its class's MRO (``metalr_public`` inherits
  ``metalr``), apart from the shared core below;
* :data:`SHARED`: ``strategies/core`` (the interface, grouping, hyper-gradients, optimizers),
  ``datasets`` (adapters, splits, loaders, meta sources), ``benchmark/training`` (the loop,
  metrics, the cell builder) and ``benchmark/models`` (the zoo).

Not the CLI, reports, tracking, tuning or planning: changing those changes no trained number,
so their edits keep every finished cell. Editing one strategy re-runs that strategy's cells
only; editing the shared code re-runs everything. Computed once per process (a few dozen small
files), from the files the installed package imports, so an editable install sees the checkout.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

#: packages whose code every cell's result depends on, whatever its strategy
SHARED = (
    "metalr_bench.strategies.core",
    "metalr_bench.datasets",
    "metalr_bench.benchmark.training",
    "metalr_bench.benchmark.models",
)
#: hex digits of the fingerprint kept in the identity, the tag and the param
LENGTH = 16


def source_path(module: str) -> Path:
    """The file (module) or folder (package) of ``module``, without importing it when it is
    not imported yet (beyond its parent packages). Tests point this at a copy of the tree."""
    loaded = sys.modules.get(module)
    spec = getattr(loaded, "__spec__", None) or importlib.util.find_spec(module)
    if spec is None or spec.origin is None and not spec.submodule_search_locations:
        raise LookupError(f"cannot locate the source of module {module!r}")
    if spec.submodule_search_locations:  # a package: its whole folder
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(str(spec.origin))


def _files(module: str) -> list[tuple[str, Path]]:
    path = source_path(module)
    if path.is_dir():
        return [(f"{module}/{p.relative_to(path).as_posix()}", p)
                for p in sorted(path.rglob("*.py")) if "__pycache__" not in p.parts]
    return [(module, path)]


def fingerprint(modules: Iterable[str]) -> str:
    """sha256 (first :data:`LENGTH` hex digits) over the name and bytes of every ``.py`` file
    of ``modules`` (packages recursively), in a fixed order."""
    h = hashlib.sha256()
    for name, path in sorted({f for m in modules for f in _files(m)}):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:LENGTH]


def strategy_modules(strategy: type) -> tuple[str, ...]:
    """The modules of ``strategy``'s class hierarchy outside :data:`SHARED` (its own file and
    the strategy files it inherits from)."""
    mods = {c.__module__ for c in strategy.__mro__ if c is not object}
    return tuple(sorted(m for m in mods
                        if not any(m == s or m.startswith(s + ".") for s in SHARED)))


@functools.cache
def code_fingerprint(strategy: type) -> str:
    """The fingerprint of the code behind a cell of ``strategy`` (a registered class): its own
    modules plus :data:`SHARED`. Cached per process (``code_fingerprint.cache_clear()``)."""
    return fingerprint((*SHARED, *strategy_modules(strategy)))


def shared_fingerprint() -> str:
    """The fingerprint of :data:`SHARED` alone: the same for every strategy of one code version,
    so the report can tell a leaderboard whose strategies ran on different shared code."""
    return _shared()


@functools.cache
def _shared() -> str:
    return fingerprint(SHARED)


def cache_clear() -> None:
    """Forget the cached fingerprints (tests that edit a copy of the tree)."""
    code_fingerprint.cache_clear()
    _shared.cache_clear()
