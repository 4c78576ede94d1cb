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

θ_r is one fixed draw, the same for every strategy and seed of a dataset: the zoo's
``build_model`` under ``torch.manual_seed(TRANSFERABILITY_SEED)`` inside a forked RNG, so the
run's own random streams are untouched. The reference uses the random start of the
pre-training itself; our starting points (ImageNet, a checkpoint file, the cached pre-training
stage) do not keep theirs, so θ_r is an independent draw from the same initialiser.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from metalr_bench.benchmark.config import BenchmarkConfig
from metalr_bench.benchmark.models.zoo import build_model
from metalr_bench.strategies.core.layers import LayerGroup, layer_groups
from torch import nn

#: seed of θ_r (logged as the run param ``transferability_seed``): the paper's year, apart
#: from the pre-training stage's seed 0 and the usual run seeds, so θ_r is never by accident
#: the random start of a pre-training or of a ``weights: none`` run
TRANSFERABILITY_SEED = 2022
#: metric names: ``transferability/<group>`` and ``transferability/mean_backbone``
PREFIX = "transferability/"
MEAN_BACKBONE = "mean_backbone"
#: the layers whose weights D compares
WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)

State = Mapping[str, torch.Tensor]


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


def random_state(arch: str, in_channels: int, num_outputs: int,
                 seed: int = TRANSFERABILITY_SEED) -> dict[str, torch.Tensor]:
    """θ_r: ``arch`` as the zoo initialises it under ``seed``; the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch, in_channels, num_outputs).state_dict()


def run_transferability(cfg: BenchmarkConfig, in_channels: int, num_outputs: int,
                        start: State | None, final: State | None) -> dict[str, float]:
    """The metrics of one finished run: ``final`` is θ_B (the selected checkpoint,
    ``TrainResult.final_state``), ``start`` θ_A, the state the trainer started from
    (``TrainResult.start_state``); nothing to measure from a random start (``weights: none``).
    The model's structure (which parameters are weight layers of which group) comes from a
    fresh ``arch``, the one that also gives θ_r."""
    if start is None or final is None or cfg.model.weights == "none":
        return {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRANSFERABILITY_SEED)
        model = build_model(cfg.model.arch, in_channels, num_outputs)
    return transferability_metrics(
        model, layer_groups(model),
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {k: v.detach().cpu() for k, v in start.items()},
        {k: v.detach().cpu() for k, v in final.items()},
    )
