"""The config's errors: :class:`ConfigError` (a problem the user can fix) and
:func:`explain`, which turns pydantic's errors into one readable line per problem naming the
field, the problem and the value given."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A config problem the user can fix; the message names the field and the fix."""



def explain(exc: ValidationError, sep: str = "; ") -> str:
    """One line per problem: ``field: message (got value)``. Several problems are numbered,
    each under its own heading (``(1) `strategies[0]`: ... (2) `lr`: ...``), so a top-level
    error never reads as part of a strategy's params' (``sep``: how a nested list joins)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"])
        loc = loc.replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required field is missing"
        got = err.get("input")
        show_got = err["type"] not in ("extra_forbidden", "missing") and not isinstance(
            got, dict | list
        )
        lines.append(f"`{loc}`: {msg}" + (f" (got {got!r})" if show_got else "") if loc else msg)
    if len(lines) > 1 and sep == "; ":
        return f"{len(lines)} problems: " + " ".join(f"({i}) {ln}"
                                                    for i, ln in enumerate(lines, 1))
    return sep.join(lines)
