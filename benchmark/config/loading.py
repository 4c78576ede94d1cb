"""Loading a config: a YAML file and/or CLI flags (CLI overrides file), ``references:`` files
expanded, validated into a :class:`~metalr_bench.benchmark.config.schema.BenchmarkConfig`;
every problem becomes one :class:`ConfigError` line naming the field and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from metalr_bench.benchmark.config.errors import ConfigError
from metalr_bench.benchmark.config.errors import explain as _explain
from metalr_bench.benchmark.config.schema import BenchmarkConfig
from pydantic import BaseModel, ValidationError


def _allowed_keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def validate_config(data: dict[str, Any]) -> BenchmarkConfig:
    """Validate a plain dict; raise :class:`ConfigError` with one readable line per problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of keys to values, got {type(data).__name__}")
    try:
        return BenchmarkConfig(**data)
    except ValidationError as exc:
        extra = [e for e in exc.errors() if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
        hint = f" Allowed top-level keys: {_allowed_keys(BenchmarkConfig)}." if extra else ""
        raise ConfigError(
            f"invalid config: {_explain(exc)}.{hint} Fix the value in the YAML file or with the "
            "matching flag (`run-benchmark --help`)."
        ) from None
    except TypeError as exc:  # e.g. a non-string key
        raise ConfigError(f"invalid config: {exc}") from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> BenchmarkConfig:
    """Read YAML ``path`` (optional), apply CLI ``overrides`` on top, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    data = deep_merge(data, overrides or {})
    if isinstance(data.get("references"), list):
        data["references"] = _expand_references(data["references"],
                                                Path(path).parent if path is not None else None)
    return validate_config(data)


def _expand_references(entries: list[Any], base: Path | None) -> list[Any]:
    """``references:`` entries that are file names become that file's rows: a YAML list of
    reference rows, or a mapping with a ``references`` list (a file beside the config is found
    relative to the config's folder, else to the working directory)."""
    out: list[Any] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            out.append(entry)
            continue
        candidates = ([base / entry] if base is not None else []) + [Path(entry)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(
                f"`references[{i}]`: file {entry!r} not found (looked in "
                f"{', '.join(str(c) for c in candidates)}); give a YAML file of reference rows "
                "relative to the config file, or the rows themselves")
        try:
            rows = yaml.safe_load(found.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"`references[{i}]`: {found} is not valid YAML: {exc}") from None
        if isinstance(rows, dict):
            rows = rows.get("references")
        if not isinstance(rows, list):
            raise ConfigError(f"`references[{i}]`: {found} must hold a list of reference rows "
                              "(or a mapping with a `references` list)")
        out += rows
    return out
