"""The ``pretrain`` stage: a pre-trained starting point when no hub is reachable.

Supervised training of the architecture on a *source* dataset (by default the synthetic source
domain). The checkpoint is cached under ``<output_dir>/cache/pretrain`` by a content hash of
everything that determines it, so every cell (and every later call) reuses it; the training run
itself is logged to MLflow with the tag ``kind=pretrain``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from metalr_bench.benchmark.config import CODE_VERSION, BenchmarkConfig, PretrainSpec
from metalr_bench.benchmark.models.zoo import imagenet_state, read_checkpoint
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.benchmark.tracking.client import MetricsLogger, Tracker
from metalr_bench.benchmark.training.cell import build
from metalr_bench.benchmark.training.trainer import TrainerOptions, seed_everything
from metalr_bench.datasets.core.base import DatasetBundle
from metalr_bench.datasets.core.registry import load_dataset
from metalr_bench.strategies.core.base import TrainSettings


def pretrain_key(arch: str, spec: PretrainSpec, size: int) -> str:
    payload = {"arch": arch, "spec": spec.model_dump(mode="json", exclude={"root"}),
               "size": size, "code": CODE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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
) -> Path:
    """Path of the cached checkpoint for (arch, spec, size), training it first if needed.

    The training is an MLflow run (``kind=pretrain``) with the same lifecycle as every other
    run (:meth:`Tracker.run`): owner tags and a heartbeat, so a re-run after a ``kill -9``
    marks it KILLED instead of leaving it RUNNING forever.
    """
    key = pretrain_key(arch, spec, size)
    path = cache_dir / f"pretrain-{arch}-{spec.dataset}-{size}px-{key}.pt"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    bundle = load_dataset(spec.dataset, root=spec.root, size=size, options=spec.options)
    settings = TrainSettings(lr=spec.lr, optimizer="adam", weight_decay=1e-4,
                             epochs=spec.epochs)
    options = TrainerOptions(epochs=spec.epochs, batch_size=spec.batch_size, device=device,
                             amp=amp, channels_last=channels_last, seed=0)

    def train(callbacks: list[MetricsLogger]) -> dict[str, float]:
        built = build(arch, bundle.in_channels, bundle.num_outputs, "full", None, settings,
                      bundle=bundle, options=options, callbacks=callbacks)
        assert built.trainer is not None
        result = built.trainer.fit()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"model": built.model.state_dict(), "arch": arch, "key": key}, tmp)
        tmp.replace(path)  # atomic: a killed pre-training never leaves a half-written file
        return result.summary()

    if tracker is None:
        train([])
        return path
    tags = {T.KIND: T.KIND_PRETRAIN, "pretrain_key": key, T.MODEL: arch,
            T.DATASET: spec.dataset}
    with tracker.run(f"pretrain-{arch}-{spec.dataset}-{size}px", tags=tags,
                     parent_id=parent_id) as run_id:
        tracker.log_params(run_id, {"arch": arch, "size": size, **spec.model_dump(mode="json")})
        summary = train([MetricsLogger(tracker, run_id)])
        tracker.log_metrics(run_id, summary)
        tracker.set_tags(run_id, {"checkpoint": str(path)})
    return path


def starting_weights(
    cfg: BenchmarkConfig, bundle: DatasetBundle, tracker: Tracker | None, parent_id: str | None
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The starting state for this dataset's input size, and its description."""
    w = cfg.model.weights
    if w == "none":
        return None, "none (random init)"
    if w == "imagenet":
        return imagenet_state(cfg.model.arch), "imagenet"
    if w == "pretrain":
        path = pretrained_checkpoint(
            cfg.model.arch, cfg.model.pretrain, bundle.image_size,
            cache_dir=Path(cfg.output_dir) / "cache" / "pretrain",
            device=cfg.resolved_device(), amp=cfg.use_amp(),
            channels_last=cfg.use_channels_last(), tracker=tracker, parent_id=parent_id,
        )
        return read_checkpoint(path), f"pretrain:{path.name}"
    return read_checkpoint(w), w
