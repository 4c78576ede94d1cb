"""Check every input before the first MLflow run exists, so bad input leaves nothing behind.

Why up front: a grid of 60 cells that fails on cell 37 because ``k`` is too large for the model,
or that hangs for minutes retrying an unreachable server, wastes an afternoon and leaves
half-written runs in MLflow. Here, in order and cheaply:

1. the tracking URI answers (HTTP: one request with a short timeout; SQLite: the folder exists
   and the file, if any, is an SQLite database);
2. the device exists;
3. every dataset loads (missing/corrupt files, bad keys, empty classes raise here), and so does
   the pre-training source (``model.weights: pretrain``) at every size the grid pre-trains at,
   unless its checkpoint is already cached: a bad source used to pass here and then fail every
   cell one after the other;
4. the starting checkpoint (``model.weights: path.pt``) fits the model;
5. every strategy setting can be built on the model (e.g. last_k's k <= number of layer groups).

Each failure is an :class:`InputError` (a :class:`ConfigError`): one message naming the input,
the problem and the fix; the CLI prints it and exits 2.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from metalr_bench.benchmark.config import BenchmarkConfig, ConfigError
from metalr_bench.benchmark.models.zoo import WeightsMismatch, read_checkpoint
from metalr_bench.benchmark.training.cell import build_parts, train_settings

SQLITE_MAGIC = b"SQLite format 3\x00"


class InputError(ConfigError):
    """An input (file, server, parameter) the run cannot use; the message says how to fix it."""


def check_tracking(uri: str, timeout_s: float = 3.0) -> None:
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            return  # something answered; MLflow calls will tell what is wrong
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            raise InputError(
                f"tracking server {uri} is not reachable ({reason}). Start it with "
                f"`mlflow server --host {parsed.hostname} --port {port}`, or log to a local "
                "file with `--tracking-uri sqlite:///mlflow.db`"
            ) from None
    elif parsed.scheme == "sqlite":
        raw = uri[len("sqlite:///"):]
        if not raw or raw == ":memory:":
            return
        db = Path(raw).expanduser()
        if not db.parent.is_dir():
            raise InputError(
                f"tracking URI {uri}: folder {db.parent} does not exist; create it "
                f"(`mkdir -p {db.parent}`) or use `--tracking-uri sqlite:///mlflow.db`"
            )
        if db.is_file() and db.stat().st_size > 0:
            with db.open("rb") as fh:
                head = fh.read(16)
            if head != SQLITE_MAGIC:
                raise InputError(
                    f"tracking URI {uri}: {db} is not an SQLite database; point "
                    "`--tracking-uri` at an MLflow SQLite file or a new path"
                )


def _describe_dataset(spec: Any) -> str:
    root = f", root={spec.root}" if spec.root else ""
    return f"dataset {spec.name!r} (size={spec.size}{root})"


def check_datasets(cfg: BenchmarkConfig, data: Any) -> None:
    """Load every dataset once through the runner's cache (later cells reuse it)."""
    seen = set()
    for cell in cfg.cells():
        key = cell.dataset.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        try:
            data.get(cell)
        except (FileNotFoundError, ValueError, OSError, KeyError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise InputError(f"{_describe_dataset(cell.dataset)}: {msg}") from None


def check_pretrain_source(cfg: BenchmarkConfig) -> None:
    """Load each pre-training source (``model.pretrain``, or a dataset's own ``pretrain``) at every side the grid pre-trains at (one checkpoint per
    target size, or the source's own ``size``), unless that checkpoint is cached already. The
    loaded source is kept for the pre-training stage that follows (not read twice)."""
    if cfg.model.weights != "pretrain":
        return
    from metalr_bench.benchmark.training.pretrain import checkpoint_path, load_source, source_size

    cache = Path(cfg.output_dir) / "cache" / "pretrain"
    jobs = {(cfg.pretrain_for(d).model_dump_json(), source_size(cfg.pretrain_for(d), d.size)):
            (cfg.pretrain_for(d), d) for d in cfg.dataset_specs()}
    for (_, size), (spec, d) in sorted(jobs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if not checkpoint_path(cfg.model.arch, spec, size, cache).is_file():
            key = "model.pretrain" if d.pretrain is None else f"datasets[{d.dataset_name}].pretrain"
            try:
                load_source(spec, size, keep=True)
            except ConfigError as exc:  # PretrainSourceError: names the source and the key
                raise InputError(f"`{key}`: {exc}") from None


def check_model_and_strategies(cfg: BenchmarkConfig, data: Any) -> None:
    """Build every (model shape, strategy, params) of the grid once, as a cell would be built
    (:func:`training.cell.build_parts`, without data loaders), and its optimizer."""
    weights = cfg.model.weights
    state = None
    if weights not in ("none", "imagenet", "pretrain"):
        try:
            state = read_checkpoint(weights)
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(f"`model.weights` ({weights}): {exc}") from None
    checked: set[tuple[Any, ...]] = set()
    for cell in cfg.cells():
        bundle = data.get(cell)
        key = (bundle.in_channels, bundle.num_outputs, cell.strategy,
               repr(sorted(cell.params.items())))
        if key in checked:
            continue
        checked.add(key)
        try:
            built = build_parts(cfg.model.arch, bundle.in_channels, bundle.num_outputs,
                          cell.strategy, cell.params,
                          train_settings(cfg.effective(cell), epochs=cfg.epochs),
                          weights=state, weights_source=weights,
                          keep_head=cfg.model.keep_head,
                          weights_mapping=cfg.model.weights_mapping,
                          drop_prefixes=cfg.model.drop_prefixes,
                          image_size=bundle.image_size)
            built.strategy.build_optimizer()
        except WeightsMismatch as exc:
            raise InputError(f"`model.weights`: {exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"strategy {cell.strategy_label} cannot run on model {cfg.model.arch!r}: {exc}"
            ) from None


def preflight(cfg: BenchmarkConfig, data: Any) -> None:
    """Run every check; raise :class:`InputError` on the first problem."""
    check_tracking(cfg.tracking_uri)
    cfg.resolved_device()  # ConfigError when CUDA was asked for but is absent
    check_datasets(cfg, data)
    check_pretrain_source(cfg)
    check_model_and_strategies(cfg, data)
