"""Check every input before the first MLflow run exists, so bad input leaves nothing behind.

Why up front: a grid of 60 cells that fails on cell 37 because ``k`` is too large for the model,
or that hangs for minutes retrying an unreachable server, wastes an afternoon and leaves
half-written runs in MLflow. Here, in order and cheaply:

1. the tracking URI answers (HTTP: one request with a short timeout; SQLite: the folder exists
   and the file, if any, is an SQLite database);
2. the output folder is a folder this user can write (or can be created as one), a
   ``tune.storage`` file's folder exists, and the device exists;
3. every dataset loads (missing/corrupt files, bad keys, empty classes raise here), and so does
   the pre-training source (``model.weights: pretrain``) at every size the grid pre-trains at,
   unless its checkpoint is already cached: a bad source used to pass here and then fail every
   cell one after the other;
4. the starting checkpoint (``model.weights: path.pt``) fits the model;
5. every strategy setting can be built on the model (e.g. last_k's k <= number of layer groups,
   lora's optional package is installed), and the model takes the dataset's image size (one
   forward pass of two blank images).

A batch larger than a training set is legal: a warning line, not an error.

Each failure is an :class:`InputError` (a :class:`ConfigError`): one message naming the input,
the problem and the fix; the CLI prints it and exits 2.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from metalr_bench.benchmark.config import BenchmarkConfig, ConfigError
from metalr_bench.benchmark.models.zoo import WeightsMismatch, read_checkpoint
from metalr_bench.benchmark.tracking import reach
from metalr_bench.benchmark.training.cell import build_parts, train_settings

SQLITE_MAGIC = reach.SQLITE_MAGIC


class InputError(ConfigError):
    """An input (file, server, parameter) the run cannot use; the message says how to fix it."""


def check_tracking(uri: str, timeout_s: float = 3.0) -> None:
    """The tracking URI answers (:func:`tracking.reach.check_tracking`, shared with `report`
    and `replay-metrics`, which must not import torch as this module does)."""
    try:
        reach.check_tracking(uri, timeout_s)
    except reach.TrackingURIError as exc:
        raise InputError(str(exc)) from None


def check_output_dir(cfg: BenchmarkConfig) -> None:
    """``output_dir`` is a folder this user can write, or can be created as one: checked here
    and not created (bad input leaves nothing behind). A file in its place used to train for
    a while and then die in the cleanup with three chained tracebacks; an unwritable one with
    a ``PermissionError`` after training."""
    out = Path(cfg.output_dir).expanduser()
    fix = "pass `--output-dir` a folder you can write (it is created if missing)"
    probe = out
    while not probe.exists() and probe != probe.parent:  # the nearest existing ancestor
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"`output_dir` ({cfg.output_dir}): {probe} is a file, not a folder; "
                         f"{fix}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"`output_dir` ({cfg.output_dir}): {probe} is not writable by this "
                         f"user; {fix}")


def check_tune_storage(cfg: BenchmarkConfig) -> None:
    """A ``tune.storage`` file (a journal path or ``sqlite:///``) in a folder that exists, as
    for the tracking URI: a typo'd folder used to be created, studies and all."""
    if not cfg.tune.enabled or cfg.tune.storage is None:
        return
    url = cfg.tune.storage
    if "://" in url and not url.startswith("sqlite:///"):
        return  # a database server: the tuning stage reports what it says
    raw = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url
    if not raw or raw == ":memory:":
        return
    folder = Path(raw).expanduser().parent
    if not folder.is_dir():
        raise InputError(f"`tune.storage` ({url}): folder {folder} does not exist; create it "
                         f"(`mkdir -p {folder}`) or leave `--tune-storage` out (default: next "
                         "to the MLflow DB)")


def _describe_dataset(spec: Any) -> str:
    root = f", root={spec.root}" if spec.root else ""
    return f"dataset {spec.adapter!r} (size={spec.size}{root})"


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
        warn_large_batch(cfg, cell, data)


def warn_large_batch(cfg: BenchmarkConfig, cell: Any, data: Any) -> None:
    """A batch larger than the training set is legal (one batch per epoch) but rarely meant:
    one warning line, not an error."""
    from metalr_bench.datasets.core.errors import DatasetWarning

    batch = cfg.effective(cell).batch_size
    n = len(data.get(cell).train)
    if batch > n:
        warnings.warn(DatasetWarning(
            f"`batch_size` {batch} is larger than the {n} training images of "
            f"{cell.dataset.dataset_key}: one batch per epoch (of all {n}); pass a smaller "
            "`--batch-size` for several steps per epoch"), stacklevel=2)


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
    shapes: set[tuple[int, int]] = set()
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
        except ImportError as exc:  # an optional package (lora: peft) is missing; its hint
            raise InputError(" ".join(str(exc).split())) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"strategy {cell.strategy_label} cannot run on model {cfg.model.arch!r}: {exc}"
            ) from None
        shape = (bundle.in_channels, bundle.image_size)
        if shape not in shapes:
            shapes.add(shape)
            check_forward(cfg, built.model, *shape)


def check_forward(cfg: BenchmarkConfig, model: Any, channels: int, size: int) -> None:
    """One forward pass of two blank images at the dataset's size: a model that cannot take
    that size (a ViT whose patch is larger than the image) used to fail in every cell."""
    import torch

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, channels, size, size, device=device))
    except (AssertionError, RuntimeError, ValueError) as exc:
        raise InputError(
            f"model {cfg.model.arch!r} cannot take {size} px images ({' '.join(str(exc).split())}); "
            "pass a larger `--image-size` or choose a model that fits (`run-benchmark list`)"
        ) from None
    finally:
        model.train(was_training)


def preflight(cfg: BenchmarkConfig, data: Any) -> None:
    """Run every check; raise :class:`InputError` on the first problem."""
    check_tracking(cfg.tracking_uri)
    check_output_dir(cfg)
    check_tune_storage(cfg)
    cfg.resolved_device()  # ConfigError when CUDA was asked for but is absent
    check_datasets(cfg, data)
    check_pretrain_source(cfg)
    check_model_and_strategies(cfg, data)
