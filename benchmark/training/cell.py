"""The one cell builder: model + starting weights + layer groups + strategy + trainer.

Why one: the runner, tuning trials, the pre-flight check, the pre-training stage and both
speed benchmarks all build "a model with a strategy on a dataset". When each wrote its own copy
they drifted (one benchmark once timed eager MetaLR while the runs were compiled). Everything
here is built in one order:

1. ``build_model`` from the zoo, then the starting ``weights`` loaded into it (not for a
   strategy that trains from the random initialisation, ``Strategy.pretrained_start = False``);
2. the model *placed*: moved to the trainer's device and memory format (channels_last), so
   whatever a strategy derives from the model's tensors (L2-SP's reference weights, say) lives
   where the model trains;
3. ``layer_groups`` (the one grouping, :mod:`metalr_bench.strategies.core.layers`);
4. the strategy from the registry, with the base :class:`TrainSettings`;
5. the :class:`Trainer` (optional: the pre-flight check needs no data loaders).

No tracking in here: the caller hands in callbacks (a tracker's ``MetricsLogger``, an Optuna
pruning reporter) and decides what to log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from metalr_bench.benchmark.config import BenchmarkConfig, Cell
from metalr_bench.benchmark.models.tv_compat import import_torchvision
from metalr_bench.benchmark.models.zoo import build_model, input_normalisation, load_state
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.benchmark.training.checkpoint import CellCheckpoint
from metalr_bench.benchmark.training.trainer import (
    Trainer,
    TrainerCallback,
    TrainerSettings,
    TrainResult,
    place_model,
    seed_everything,
)
from metalr_bench.datasets.core.base import DatasetBundle
from metalr_bench.datasets.core.registry import load_dataset
from metalr_bench.strategies.core.base import Strategy, TrainSettings
from metalr_bench.strategies.core.layers import LayerGroup, layer_groups
from metalr_bench.strategies.core.registry import get_strategy
from torch import nn


@dataclass
class CellResult:
    """What happened to one grid cell (the runner's leaderboard and the executors' results)."""

    cell: Cell
    run_id: str
    config_hash: str
    status: str
    summary: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    skipped: bool = False  # an earlier call already finished it (resume)


class DataCache:
    """Load each dataset once per process (the cells of a grid share it)."""

    def __init__(self) -> None:
        self._data: dict[str, DatasetBundle] = {}

    def get(self, cell: Cell) -> DatasetBundle:
        d = cell.dataset
        key = d.model_dump_json()
        if key not in self._data:
            self._data[key] = load_dataset(
                d.name, root=d.root, size=d.size, download=d.download,
                allow_md5_mismatch=d.allow_md5_mismatch, options=d.options,
            )
        return self._data[key]


@dataclass
class BuiltCell:
    model: nn.Module
    groups: list[LayerGroup]
    strategy: Strategy
    trainer: Trainer | None = None


def build_parts(
    arch: str,
    in_channels: int,
    num_outputs: int,
    strategy: str,
    params: dict[str, Any] | None,
    settings: TrainSettings,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    weights_source: str = "",
    keep_head: bool = False,
    weights_mapping: str = "names",
    drop_prefixes: list[str] | tuple[str, ...] | None = None,
    image_size: int | None = None,
    device: str = "cpu",
    channels_last: bool = False,
    bundle: DatasetBundle | None = None,
    trainer_settings: TrainerSettings | None = None,
    callbacks: list[TrainerCallback] | None = None,
    checkpoint: CellCheckpoint | None = None,
) -> BuiltCell:
    """Build a cell's parts from explicit arguments, in the one order of the module docstring
    (the pre-training stage, the pre-flight check and the speed benchmarks, which have no grid
    cell, call this; :func:`build_cell` is the same for a config's grid cell); with ``bundle``
    and ``trainer_settings`` also its trainer (whose device and memory format then win over
    ``device``/``channels_last``; ``settings`` are the strategy's).
    ``image_size`` (default: the bundle's) sizes models with a fixed input size (a timm ViT).
    """
    if image_size is None and bundle is not None:
        image_size = bundle.image_size
    cls = get_strategy(strategy)
    # torchvision through the compat shim before any strategy's own packages import it (lora:
    # peft -> transformers -> torchvision, which dies on a CPU torch next to a CUDA torchvision)
    import_torchvision()
    model = build_model(arch, in_channels, num_outputs, image_size)
    if weights is not None and cls.pretrained_start:  # `scratch` keeps the random start
        load_state(model, arch, weights, weights_source, keep_head=keep_head,
                   mapping=weights_mapping, drop_prefixes=drop_prefixes)
    if trainer_settings is not None:
        device, channels_last = trainer_settings.device, trainer_settings.channels_last
    model = place_model(model, torch.device(device), channels_last)
    groups = layer_groups(model)
    strat = cls(params, model, groups, settings)
    trainer = None
    if bundle is not None and trainer_settings is not None:
        trainer = Trainer(bundle, model, groups, strat, trainer_settings, callbacks, checkpoint)
    return BuiltCell(model, groups, strat, trainer)


def train_settings(cfg: BenchmarkConfig, *, epochs: int, n_train: int = 0) -> TrainSettings:
    """The strategy's base settings from the config (``cfg`` with the cell's overrides)."""
    return TrainSettings(
        lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
        momentum=cfg.momentum, epochs=epochs,
        steps_per_epoch=max(n_train // cfg.batch_size, 1),
    )


def _pipeline(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Normalisation and crop of ``input_pipeline``: the suite's (normalised for the weights:
    for ImageNet weights what the model's card says, ImageNet mean/std or [-1, 1]; [-1, 1]
    otherwise), the public MetaLR code's (its crop, ``RandomResizedCrop(scale=(0.8, 1.0),
    ratio=(0.8, 1.25))``, and its mean 0.18 / std 0.24, fitted to its ultrasound weights), or
    ``metalr_public_crop``: the code's crop with the weights' own normalisation."""
    weights_norm = (input_normalisation(cfg.model.arch) if cfg.model.weights == "imagenet"
                    else "symmetric")
    public_crop = {"resized_crop": (0.8, 1.0), "crop_ratio": (0.8, 1.25)}
    if cfg.input_pipeline == "metalr_public":
        return {"normalize": "metalr_public", **public_crop}
    if cfg.input_pipeline == "metalr_public_crop":
        return {"normalize": weights_norm, **public_crop}
    return {"normalize": weights_norm}


def trainer_settings(cfg: BenchmarkConfig, *, seed: int, epochs: int,
                     evaluate_test: bool = True, hflip: bool | None = None) -> TrainerSettings:
    """The trainer's settings from the config (``cfg`` with the cell's overrides)."""
    return TrainerSettings(
        epochs=epochs, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        device=cfg.resolved_device(), amp=cfg.use_amp(), channels_last=cfg.use_channels_last(),
        compile=cfg.compile, augment=cfg.augment, hflip=hflip, precise_bn=cfg.precise_bn,
        **_pipeline(cfg),
        selection_metric=cfg.selection_metric,
        seed=seed, log_every_n_steps=cfg.log_every_n_steps,
        deterministic=cfg.deterministic, evaluate_test=evaluate_test,
        lr_milestones=tuple(cfg.lr_milestones), lr_gamma=cfg.lr_gamma,
    )


def build_cell(
    cfg: BenchmarkConfig,
    cell: Cell,
    bundle: DatasetBundle,
    weights: dict[str, torch.Tensor] | None,
    callbacks: list[TrainerCallback] | None = None,
    *,
    epochs: int | None = None,
    checkpoint: CellCheckpoint | None = None,
    evaluate_test: bool = True,
) -> BuiltCell:
    """The grid cell ``cell`` of ``cfg``, seeded, ready to ``trainer.fit()``.

    ``evaluate_test=False`` (tuning) never touches the test split.
    """
    cfg = cfg.effective(cell)
    seed_everything(cell.seed)
    epochs = epochs or cfg.epochs
    return build_parts(
        cfg.model.arch, bundle.in_channels, bundle.num_outputs, cell.strategy, cell.params,
        train_settings(cfg, epochs=epochs, n_train=len(bundle.train)),
        weights=weights, weights_source=cfg.model.weights, keep_head=cfg.model.keep_head,
        weights_mapping=cfg.model.weights_mapping, drop_prefixes=cfg.model.drop_prefixes,
        bundle=bundle,
        trainer_settings=trainer_settings(cfg, seed=cell.seed, epochs=epochs,
                                          evaluate_test=evaluate_test, hflip=cell.dataset.hflip),
        callbacks=callbacks, checkpoint=checkpoint,
    )


def strategy_tags(strategy: str) -> dict[str, str]:
    """The run tags the strategy named ``strategy`` adds: ``mechanism`` (its
    ``Strategy.mechanism``, the metric that shows it acted), absent when it has none."""
    mechanism = get_strategy(strategy).mechanism
    return {T.MECHANISM: mechanism} if mechanism else {}


def train_cell(
    cfg: BenchmarkConfig,
    cell: Cell,
    bundle: DatasetBundle,
    weights: dict[str, torch.Tensor] | None,
    callbacks: list[TrainerCallback] | None = None,
    *,
    resume: dict[str, Any] | None = None,
    artifacts: bool = True,
    **build_options: Any,
) -> TrainResult:
    """Build ``cell`` (``build_options``: :func:`build_cell`'s ``epochs``, ``checkpoint``,
    ``evaluate_test``) and train it, from ``resume`` (a checkpoint payload) when given; no
    tracking in here. The one result carries the selected checkpoint's weights
    (``final_state``) and, with ``artifacts``, the strategy's files (``artifacts``: drawn
    once here; tuning trials, which log none, pass False)."""
    built = build_cell(cfg, cell, bundle, weights, callbacks, **build_options)
    assert built.trainer is not None
    result = built.trainer.fit(resume)
    result.final_values = built.strategy.final_values()
    if artifacts:
        result.artifacts = built.strategy.artifacts()
    return result
