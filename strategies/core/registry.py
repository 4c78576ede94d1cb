"""Find strategies: every module of the ``metalr_bench.strategies`` package, and every entry
point in the group ``metalr_bench.strategies`` (a user's own package adds a strategy without
touching this one). A strategy module registers its class with ``@register``; nothing lists
strategy names. Discovery runs once, lazily, on the first look-up (``--help`` stays fast).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil

from metalr_bench.strategies.core.base import STRATEGIES, Strategy

#: entry-point group a third-party package declares its strategy modules under, e.g. in its
#: pyproject.toml: ``[project.entry-points."metalr_bench.strategies"] shrink = "mypkg.shrink"``
ENTRY_POINT_GROUP = "metalr_bench.strategies"
_discovered = False


def discover(*, refresh: bool = False) -> dict[str, type[Strategy]]:
    """Import every strategy module (package scan, then entry points) once; ``refresh`` looks
    again (after installing a package in a running process, as the tests do)."""
    global _discovered
    if _discovered and not refresh:
        return STRATEGIES
    import metalr_bench.strategies as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    _discovered = True
    return STRATEGIES


def available_strategies() -> list[str]:
    return sorted(discover())


def default_strategies() -> list[str]:
    """The quick benchmark's grid when a config names no strategy (``default_rank`` order)."""
    ranked = [(cls.default_rank, name) for name, cls in discover().items()
              if cls.default_rank is not None]
    return [name for _, name in sorted(ranked)]


def get_strategy(name: str) -> type[Strategy]:
    strategies = discover()
    if name not in strategies:
        raise KeyError(
            f"unknown strategy {name!r}; available: {', '.join(available_strategies())}"
        )
    return strategies[name]
