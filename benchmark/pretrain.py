"""The ``pretrain`` stage: a pre-trained starting point when no hub is reachable.

Supervised training of the architecture on a *source* dataset (by default the synthetic source
domain). The checkpoint is cached under ``<output_dir>/cache/pretrain`` by a content hash of
everything that determines it, so every cell (and every later call) reuses it; the training run
itself is logged to MLflow with the tag ``stage=pretrain``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from metalr_bench.benchmark.config import CODE_VERSION, PretrainSpec
from metalr_bench.benchmark.layer_groups import layer_groups
from metalr_bench.benchmark.models import build_model
from metalr_bench.benchmark.trainer import Trainer, TrainerOptions, seed_everything
from metalr_bench.datasets.registry import load_dataset
from metalr_bench.strategies.base import TrainSettings
from metalr_bench.strategies.full import FullFineTune


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
    tracker=None,
    parent_id: str | None = None,
) -> Path:
    """Path of the cached checkpoint for (arch, spec, size), training it first if needed."""
    key = pretrain_key(arch, spec, size)
    path = cache_dir / f"pretrain-{arch}-{spec.dataset}-{size}px-{key}.pt"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    bundle = load_dataset(spec.dataset, root=spec.root, size=size, options=spec.options)
    model = build_model(arch, bundle.in_channels, bundle.num_outputs)
    groups = layer_groups(model)
    settings = TrainSettings(lr=spec.lr, optimizer="adam", weight_decay=1e-4,
                             epochs=spec.epochs)
    strategy = FullFineTune(None, model, groups, settings)
    options = TrainerOptions(epochs=spec.epochs, batch_size=spec.batch_size, device=device,
                             amp=amp, channels_last=channels_last, seed=0)
    callbacks = []
    run_ctx = None
    if tracker is not None:
        from metalr_bench.benchmark.tracking import MetricsLogger

        run_ctx = tracker.run(f"pretrain-{arch}-{spec.dataset}-{size}px",
                              tags={"stage": "pretrain", "pretrain_key": key, "model": arch,
                                    "dataset": spec.dataset}, parent_id=parent_id)
        run_id = run_ctx.__enter__()
        tracker.log_params(run_id, {"arch": arch, "size": size, **spec.model_dump(mode="json")})
        callbacks.append(MetricsLogger(tracker, run_id))
    try:
        result = Trainer(bundle, model, groups, strategy, options, callbacks).fit()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"model": model.state_dict(), "arch": arch, "key": key}, tmp)
        tmp.replace(path)  # atomic: a killed pre-training never leaves a half-written file
        if run_ctx is not None:
            tracker.log_metrics(run_id, result.summary())
            tracker.set_tags(run_id, {"checkpoint": str(path)})
    except BaseException as exc:
        if run_ctx is not None:
            run_ctx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if run_ctx is not None:
        run_ctx.__exit__(None, None, None)
    return path
