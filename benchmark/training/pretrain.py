"""The ``pretrain`` stage: a pre-trained starting point when no hub is reachable.

Supervised training of the architecture on a *source* dataset: any dataset entry
(``model.pretrain``: a MedMNIST file, with ``allow_md5_mismatch`` for a copy that is not the
official file, an ``imagefolder`` or ``csv``, with its size and options), by default the
synthetic source domain. The checkpoint is cached under ``<output_dir>/cache/pretrain`` by a
content hash of everything that determines it, so every cell (and every later call) reuses it;
the training run itself is logged to MLflow with the tag ``kind=pretrain``. With ``progress``
the stage says what it trains and prints one line per epoch on stderr, since a large source
trains for minutes.

The checkpoint also keeps the random initialisation the pre-training started from (key
``start``, the trainer's own copy of its first state): per-layer transferability (Chen et al.
2022) measures a layer against *that* start, θ_r (:func:`pretrain_start`). A checkpoint cached by
an earlier version has no ``start``; it stays valid (same cache key, nothing re-trained) and
transferability then falls back to an independent random draw, which the run says
(``transferability_reference: random_draw``). Delete the cached file to re-train it with its
start.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from metalr_bench.benchmark.config import (
    CODE_VERSION,
    BenchmarkConfig,
    ConfigError,
    DatasetSpec,
    PretrainSpec,
)
from metalr_bench.benchmark.fingerprint import shared_fingerprint
from metalr_bench.benchmark.models.zoo import imagenet_state, read_checkpoint
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.benchmark.tracking.client import MetricsLogger, Tracker
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.trainer import (
    TrainerCallback,
    TrainerSettings,
    seed_everything,
)
from metalr_bench.datasets.core.base import DatasetBundle
from metalr_bench.datasets.core.medmnist_info import INFO as MEDMNIST
from metalr_bench.datasets.core.registry import load_dataset
from metalr_bench.strategies.core.base import TrainSettings
from tqdm import tqdm


class PretrainSourceError(ConfigError):
    """The pre-training source cannot be loaded; the message names it and the fix."""


def source_size(spec: PretrainSpec, target_size: int) -> int:
    """The image side the source trains at: its own ``size``, else the target's."""
    return spec.size if spec.size is not None else target_size


def _source_location(spec: PretrainSpec) -> str | None:
    """Where the source's content lives, when that decides the content.

    An official MedMNIST file is pinned by its MD5 wherever it lies, so moving it keeps the
    cached checkpoint; a copy accepted with ``allow_md5_mismatch``, an image folder or a CSV
    is what its folder holds, so two folders must not share a checkpoint.
    """
    if spec.root is None or (spec.dataset in MEDMNIST and not spec.allow_md5_mismatch):
        return None
    return str(Path(spec.root).expanduser().resolve())


def pretrain_key(arch: str, spec: PretrainSpec, size: int) -> str:
    """Hash of everything that determines the checkpoint; ``size`` is the source's side.

    ``download`` is left out (it only fetches a missing file, which is then MD5-checked), and so
    is ``spec.size`` (the ``size`` argument is the resolved side). ``allow_md5_mismatch`` and the
    location enter only when they matter. The code enters as the fingerprint of the code the
    pre-training runs (:func:`fingerprint.shared_fingerprint`: the trainer, the models, the
    datasets, the strategies' core), as a cell's identity does: a checkpoint the old code wrote
    is not reused after an upgrade that would train another one (``CODE_VERSION`` alone, the
    earlier key, was never bumped); edits to reports, the CLI or tracking keep it.
    """
    fields = spec.model_dump(mode="json", exclude={"root", "size", "download"})
    if not spec.allow_md5_mismatch:
        del fields["allow_md5_mismatch"]
    payload = {"arch": arch, "spec": fields, "size": size, "code": CODE_VERSION,
               "code_fingerprint": shared_fingerprint()}
    location = _source_location(spec)
    if location is not None:
        payload["root"] = location
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _describe_source(spec: PretrainSpec, size: int) -> str:
    root = f", root {spec.root}" if spec.root else ""
    return f"pretrain source {spec.dataset!r} (size {size}{root})"


#: sources the pre-flight check loaded, handed to the pre-training stage that follows it (once:
#: popped on use), so a large source is not read twice
_PREFLIGHT_SOURCES: dict[tuple[str, int], DatasetBundle] = {}


def load_source(spec: PretrainSpec, size: int, *, keep: bool = False) -> DatasetBundle:
    """The source dataset at ``size`` px; a failure names the source and its config key.

    ``keep`` (the pre-flight check): hold the loaded source for the pre-training stage, which
    then takes it instead of loading it again.
    """
    key = (spec.model_dump_json(), size)
    if key in _PREFLIGHT_SOURCES:
        return _PREFLIGHT_SOURCES[key] if keep else _PREFLIGHT_SOURCES.pop(key)
    try:
        bundle = load_dataset(spec.dataset, root=spec.root, size=size, download=spec.download,
                              allow_md5_mismatch=spec.allow_md5_mismatch, options=spec.options)
        if keep:
            _PREFLIGHT_SOURCES[key] = bundle
        return bundle
    except (ValueError, KeyError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise PretrainSourceError(
            f"{_describe_source(spec, size)}: {msg}\n(The pre-training source is `model.pretrain` "
            "in the config: dataset, root, size, download, allow_md5_mismatch, options; the "
            "dataset flags such as --allow-md5-mismatch apply to the target datasets only.)"
        ) from None


class EpochLines(TrainerCallback):
    """One stderr line per epoch, written through ``tqdm.write`` so an active bar stays whole."""

    def __init__(self, label: str, epochs: int) -> None:
        self.label, self.epochs = label, epochs

    def write(self, text: str) -> None:
        tqdm.write(f"{self.label}: {text}", file=sys.stderr)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        shown = " ".join(f"{k} {metrics[k]:.3g}" for k in
                         ("train_loss", "val_loss", "val_acc", "val_auc") if k in metrics)
        seconds = metrics.get("epoch_time_s")
        took = f" ({seconds:.0f} s)" if seconds is not None else ""
        self.write(f"epoch {epoch + 1}/{self.epochs} {shown}{took}")


def checkpoint_path(arch: str, spec: PretrainSpec, size: int, cache_dir: Path) -> Path:
    """Where the checkpoint for (arch, spec, target ``size``) is cached (it may not exist yet)."""
    size = source_size(spec, size)
    key = pretrain_key(arch, spec, size)
    # ``timm:<name>`` -> ``timm-<name>``: no colon in a file name (Windows, some file systems)
    return cache_dir / f"pretrain-{arch.replace(':', '-')}-{spec.dataset}-{size}px-{key}.pt"


def pretrain_cache_dir(cfg: BenchmarkConfig) -> Path:
    return Path(cfg.output_dir) / "cache" / "pretrain"


def pretrain_start(path: Path) -> dict[str, torch.Tensor] | None:
    """The random initialisation the cached pre-training at ``path`` started from, bit for bit;
    None for a checkpoint of an earlier version, which did not keep it."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    start = obj.get("start") if isinstance(obj, dict) else None
    return dict(start) if isinstance(start, dict) else None


def pretrained_checkpoint(
    arch: str,
    spec: PretrainSpec,
    size: int,
    *,
    cache_dir: Path,
    device: str,
    amp: bool = False,
    channels_last: bool = False,
    tracker: Tracker | None = None,
    parent_id: str | None = None,
    progress: bool = False,
    system_metrics: float | None = None,
) -> Path:
    """Path of the cached checkpoint for (arch, spec, size), training it first if needed.

    ``size`` is the target's image side; the source trains at ``spec.size`` when given. The
    training is an MLflow run (``kind=pretrain``) with the same lifecycle as every other run
    (:meth:`Tracker.run`): owner tags and a heartbeat, so a re-run after a ``kill -9`` marks it
    KILLED instead of leaving it RUNNING forever. ``progress``: a line when the training starts,
    one per epoch and one at the end, on stderr (a cached checkpoint prints nothing).
    A source that cannot be loaded raises :class:`PretrainSourceError` (a ``ConfigError``).
    ``system_metrics``: the run's MLflow system-metrics interval (s), None for none.
    """
    path = checkpoint_path(arch, spec, size, cache_dir)
    size = source_size(spec, size)
    key = pretrain_key(arch, spec, size)
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    bundle = load_source(spec, size)
    settings = TrainSettings(lr=spec.lr, optimizer="adam", weight_decay=1e-4,
                             epochs=spec.epochs)
    trainer_settings = TrainerSettings(epochs=spec.epochs, batch_size=spec.batch_size,
                                       device=device, amp=amp, channels_last=channels_last, seed=0)
    name = spec.dataset if bundle.name in ("", spec.dataset) else f"{spec.dataset} {bundle.name}"
    lines = EpochLines(f"pretrain {arch} on {name}@{size}", spec.epochs) if progress else None

    def train(callbacks: list[TrainerCallback]) -> dict[str, float]:
        if lines is not None:
            lines.write(f"{spec.epochs} epoch(s) on {len(bundle.train)} training images, "
                        f"then cached in {cache_dir}")
            callbacks = [*callbacks, lines]
        t0 = time.perf_counter()
        built = build_parts(arch, bundle.in_channels, bundle.num_outputs, "full", None, settings,
                            bundle=bundle, trainer_settings=trainer_settings,
                            callbacks=callbacks)
        assert built.trainer is not None
        result = built.trainer.fit()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        # ``start``: the trainer's copy of the first state, the θ_r of transferability
        assert result.start_state is not None
        start = {k: v.detach().cpu() for k, v in result.start_state.items()}
        torch.save({"model": built.model.state_dict(), "start": start, "arch": arch,
                    "key": key}, tmp)
        tmp.replace(path)  # atomic: a killed pre-training never leaves a half-written file
        if lines is not None:
            acc = result.best_val.get("acc")
            best = (f", best val_acc {acc:.3g} (epoch {result.best_epoch + 1})"
                    if acc is not None else "")
            lines.write(f"done in {time.perf_counter() - t0:.0f} s{best}: {path.name}")
        return result.summary()

    if tracker is None:
        train([])
        return path
    tags = {T.KIND: T.KIND_PRETRAIN, "pretrain_key": key, T.MODEL: arch,
            T.DATASET: spec.dataset}
    with tracker.run(f"pretrain-{arch}-{spec.dataset}-{size}px", tags=tags,
                     parent_id=parent_id, system_metrics=system_metrics) as run_id:
        tracker.log_params(run_id, {"arch": arch, **spec.model_dump(mode="json"), "size": size})
        summary = train([MetricsLogger(tracker, run_id)])
        tracker.log_metrics(run_id, summary)
        tracker.set_tags(run_id, {"checkpoint": str(path)})
    return path


def starting_weights(
    cfg: BenchmarkConfig, bundle: DatasetBundle, tracker: Tracker | None, parent_id: str | None,
    *, progress: bool = True, dataset: DatasetSpec | None = None,
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The starting state for this dataset's input size, and its description.

    ``progress``: the pre-training stage's lines when it trains (once; cached afterwards).
    ``dataset``: the target's config entry; its own ``pretrain`` source, when it has one,
    replaces ``model.pretrain`` (a target must not pre-train on itself).
    """
    w = cfg.model.weights
    if w == "none":
        return None, "none (random init)"
    if w == "imagenet":
        return imagenet_state(cfg.model.arch, bundle.in_channels, bundle.image_size), "imagenet"
    if w == "pretrain":
        path = pretrained_checkpoint(
            cfg.model.arch,
            cfg.pretrain_for(dataset) if dataset is not None else cfg.model.pretrain,
            bundle.image_size,
            cache_dir=pretrain_cache_dir(cfg),
            device=cfg.resolved_device(), amp=cfg.use_amp(),
            channels_last=cfg.use_channels_last(), tracker=tracker, parent_id=parent_id,
            progress=progress, system_metrics=cfg.system_metrics_every(),
        )
        return read_checkpoint(path), f"pretrain:{path.name}"
    return read_checkpoint(w), w
