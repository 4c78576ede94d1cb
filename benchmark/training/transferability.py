"""Per-layer transferability of the pre-trained weights (Chen et al. 2022).

"Rethinking Two Consensuses of the Transferability in Deep Learning" measures how much closer
pre-training put each layer to where fine-tuning ended than a random start would have been:

    T_g = D(θ_r, θ_B) / D(θ_A, θ_B)

θ_A: the pre-trained start of a run; θ_B: where its fine-tuning ended (the selected checkpoint,
the weights the drift metrics also compare); θ_r: a random initialisation of the same
architecture. T > 1: the pre-trained layer is closer to the fine-tuned one than a random start.

D, as in the reference code (``cal_transferability.py`` of Schuture/Transferability-of-
Pre-trained-DNNs): for one layer, the mean absolute difference of its *weight* tensor (biases
and BatchNorm left out); for a layer group, the plain mean of its layers' D (each layer counts
once, whatever its size; not a pooled mean over all elements); T_g is the ratio of the two
group means. Layers are the convolutions and linear layers a group owns, chosen by module type
(the reference selects ResNet-50 parameter names containing ``conv``, which also drops the
downsample convolutions; ours keeps them: they are layers of their block).

The head is left out: every cell replaces it with a fresh random one, so it has no pre-trained
θ_A to speak of. A group whose weights did not move (a frozen group of ``last_k``,
D(θ_A, θ_B) = 0) has no finite T and is left out too; ``mean_backbone`` (the reference's
whole-network number: the mean of T over all groups but the head) is then not given either.

θ_r, as in the reference, is the random initialisation the source network itself started
from, when we know it (MLflow param ``transferability_reference``):

* ``pretrain_start``: weights from the suite's own pre-training stage, whose cached checkpoint
  keeps its first state (``benchmark.training.pretrain``). θ_r is that state, mapped into the
  target network exactly as θ_A was (same stem adaptation, same head rule), so θ_r and θ_A are
  the two ends of one pre-training.
* ``random_draw``: external weights (ImageNet, a checkpoint file) whose random start is unknown,
  or a pre-training checkpoint cached by an earlier version that did not keep it. θ_r is then an
  independent draw from the same initialiser: the zoo's ``build_model`` under
  ``torch.manual_seed(TRANSFERABILITY_SEED)`` (param ``transferability_seed``) inside a forked
  RNG, so the run's own random streams are untouched. This is a deviation from the paper and
  it matters: on the quick benchmark an independent draw gave a profile with rank correlation
  0.53 to the true one, and flipped one strategy's LR-vs-T correlation. The report labels such
  figures.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from metalr_bench.benchmark.config import BenchmarkConfig, DatasetSpec
from metalr_bench.benchmark.models.zoo import build_model, load_state
from metalr_bench.benchmark.training.pretrain import (
    checkpoint_path,
    pretrain_cache_dir,
    pretrain_start,
)
from metalr_bench.datasets.core.base import DatasetBundle
from metalr_bench.strategies.core.layers import LayerGroup, layer_groups
from torch import nn

#: seed of θ_r (logged as the run param ``transferability_seed``): the paper's year, apart
#: from the pre-training stage's seed 0 and the usual run seeds, so θ_r is never by accident
#: the random start of a pre-training or of a ``weights: none`` run
TRANSFERABILITY_SEED = 2022
#: values of the run param ``transferability_reference``: what θ_r is
PRETRAIN_START = "pretrain_start"
RANDOM_DRAW = "random_draw"
#: metric names: ``transferability/<group>`` and ``transferability/mean_backbone``
PREFIX = "transferability/"
MEAN_BACKBONE = "mean_backbone"
#: the layers whose weights D compares
WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)

State = Mapping[str, torch.Tensor]

log = logging.getLogger(__name__)


def weight_layers(model: nn.Module, group: LayerGroup) -> list[str]:
    """Parameter names of the convolution and linear weights ``group`` owns, in model order."""
    owned = set(group.params)
    return [f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, WEIGHT_LAYERS) and f"{name}.weight" in owned]


def layer_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """D of one layer: the mean absolute difference of two weight tensors (in float64)."""
    return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().mean())


def group_transferability(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    random: State,
    pretrained: State,
    finetuned: State,
) -> dict[str, float]:
    """T per layer group but the head (the last group), from three state dicts of ``model``'s
    architecture; groups without weight layers, and groups that did not move, are left out."""
    out: dict[str, float] = {}
    for group in groups[:-1]:
        layers = weight_layers(model, group)
        if not layers:
            continue
        d_rb = sum(layer_distance(random[n], finetuned[n]) for n in layers) / len(layers)
        d_ab = sum(layer_distance(pretrained[n], finetuned[n]) for n in layers) / len(layers)
        if d_ab > 0:
            out[group.name] = d_rb / d_ab
    return out


def transferability_metrics(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    random: State,
    pretrained: State,
    finetuned: State,
) -> dict[str, float]:
    """``transferability/<group>`` per group and, when every backbone group with weight layers
    has a T, ``transferability/mean_backbone``."""
    per_group = group_transferability(model, groups, random, pretrained, finetuned)
    out = {f"{PREFIX}{g}": t for g, t in per_group.items()}
    backbone = [g for g in groups[:-1] if weight_layers(model, g)]
    if per_group and len(per_group) == len(backbone):
        out[PREFIX + MEAN_BACKBONE] = sum(per_group.values()) / len(per_group)
    return out


def _random_model(arch: str, in_channels: int, num_outputs: int, seed: int,
                  image_size: int | None = None) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch, in_channels, num_outputs, image_size)


def random_state(arch: str, in_channels: int, num_outputs: int,
                 seed: int = TRANSFERABILITY_SEED,
                 image_size: int | None = None) -> dict[str, torch.Tensor]:
    """``arch`` as the zoo initialises it under ``seed``; the caller's RNG is untouched."""
    return _random_model(arch, in_channels, num_outputs, seed, image_size).state_dict()


def reference_state(cfg: BenchmarkConfig, bundle: DatasetBundle,
                    dataset: DatasetSpec | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """θ_r for a run of ``cfg`` on ``bundle``, and what it is (:data:`PRETRAIN_START` or
    :data:`RANDOM_DRAW`, see the module docstring).

    ``pretrain_start``: the cached pre-training's first state loaded into the target network
    with the same :func:`load_state` call that loaded θ_A (the head, which T leaves out, stays
    the fixed draw). The checkpoint exists: the run's own starting weights came from it.
    ``dataset``: the run's dataset entry, whose own ``pretrain`` source wins over the model's.
    """
    m = cfg.model
    arch, c, k = m.arch, bundle.in_channels, bundle.num_outputs
    if m.weights == "pretrain":
        source = cfg.pretrain_for(dataset) if dataset is not None else m.pretrain
        path = checkpoint_path(arch, source, bundle.image_size, pretrain_cache_dir(cfg))
        start = pretrain_start(path) if path.is_file() else None
        if start is not None:
            model = _random_model(arch, c, k, TRANSFERABILITY_SEED, bundle.image_size)
            load_state(model, arch, start, f"{path} (its start)", keep_head=m.keep_head,
                       mapping=m.weights_mapping, drop_prefixes=m.drop_prefixes)
            return {n: v.detach().cpu() for n, v in model.state_dict().items()}, PRETRAIN_START
        log.warning("transferability: the cached pre-training %s does not keep its random "
                    "start (an earlier version wrote it); θ_r is an independent random draw "
                    "(transferability_reference: random_draw). Delete the file to re-train it "
                    "with its start.", path)
    return random_state(arch, c, k, image_size=bundle.image_size), RANDOM_DRAW


def run_transferability(cfg: BenchmarkConfig, bundle: DatasetBundle, start: State | None,
                        final: State | None, dataset: DatasetSpec | None = None
                        ) -> tuple[dict[str, float], dict[str, Any]]:
    """The metrics of one finished run and the params saying what θ_r was: ``final`` is θ_B
    (the selected checkpoint, ``TrainResult.final_state``), ``start`` θ_A, the state the
    trainer started from (``TrainResult.start_state``); nothing to measure from a random start
    (``weights: none``). The model's structure (which parameters are weight layers of which
    group) comes from a fresh ``arch``.

    Params: ``transferability_reference`` (``pretrain_start`` / ``random_draw``) and, for a
    random draw, its ``transferability_seed``; none when no T was measured.
    """
    if start is None or final is None or cfg.model.weights == "none":
        return {}, {}
    random, kind = reference_state(cfg, bundle, dataset)
    model = _random_model(cfg.model.arch, bundle.in_channels, bundle.num_outputs,
                          TRANSFERABILITY_SEED, bundle.image_size)
    metrics = transferability_metrics(
        model, layer_groups(model), random,
        {k: v.detach().cpu() for k, v in start.items()},
        {k: v.detach().cpu() for k, v in final.items()},
    )
    if not metrics:
        return {}, {}
    params: dict[str, Any] = {"transferability_reference": kind}
    if kind == RANDOM_DRAW:
        params["transferability_seed"] = TRANSFERABILITY_SEED
    return metrics, params
