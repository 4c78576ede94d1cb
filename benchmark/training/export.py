"""A trained cell as a model a user can load: the network with its preprocessing built in.

Why: the race (``run-benchmark race``) ends with the model a user came for, logged as an MLflow
model. A bare network expects inputs normalised the way its weights were trained (the suite's
[-1, 1], ImageNet mean/std, the public MetaLR code's statistics) and returns logits; a user
would have to find out both. :class:`ServingModel` takes images as float pixels in [0, 1]
(N, C, S, S), normalises them exactly as the trainer's loaders do (:func:`normalisation`,
derived from the same options) and returns per-class probabilities (softmax; sigmoid per label
for multi-label), the scores the suite's metrics read. :func:`preprocessing` describes the
input contract (size, channels, mean/std, class names, task) for the model's metadata.

The selected weights of a cell (``TrainResult.final_state``: the checkpoint chosen on
validation, after the strategy's last word such as LoRA's merge) are kept on disk by
:func:`save_selected` when the runner is asked to (the race's confirmation cells), so the
winner's model is exactly the checkpoint its run tested.

No tracking in here (as everywhere in ``training``); the race logs and registers the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from metalr_bench.benchmark.models.zoo import build_model
from metalr_bench.benchmark.training.metrics import compute_metrics
from metalr_bench.datasets.core.base import DatasetBundle, TaskType
from metalr_bench.datasets.core.tensors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    METALR_PUBLIC_MEAN_STD,
)
from torch import nn


def normalisation(normalize: str, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` on [0, 1] pixels of a loader's ``normalize`` option
    (:func:`datasets.core.tensors.to_float`): ``symmetric`` is mean = std = 0.5 ([-1, 1])."""
    if normalize == "symmetric":
        return [0.5] * channels, [0.5] * channels
    if normalize == "imagenet":
        if channels == 3:
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        return [sum(IMAGENET_MEAN) / 3] * channels, [sum(IMAGENET_STD) / 3] * channels
    if normalize == "metalr_public":
        mean, std = METALR_PUBLIC_MEAN_STD
        return [mean] * channels, [std] * channels
    raise ValueError(f"normalize={normalize!r}: no export rule for it")


class ServingModel(nn.Module):
    """``network`` behind the suite's input normalisation, returning class probabilities.

    Input: float32 (N, C, S, S), pixel values in [0, 1]. Output: (N, classes) probabilities.
    """

    def __init__(self, network: nn.Module, mean: list[float], std: list[float],
                 multilabel: bool) -> None:
        super().__init__()
        self.network = network
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
        self.multilabel = multilabel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network((x.float() - self.mean) / self.std).float()
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)


def serving_model(arch: str, bundle: DatasetBundle, state: dict[str, torch.Tensor],
                  normalize: str) -> ServingModel:
    """The network of ``arch`` for ``bundle``'s task with ``state`` loaded, on CPU, eval mode."""
    net = build_model(arch, bundle.in_channels, bundle.num_outputs, bundle.image_size)
    net.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    mean, std = normalisation(normalize, bundle.in_channels)
    return ServingModel(net, mean, std, bundle.task is TaskType.MULTILABEL).eval()


def preprocessing(bundle: DatasetBundle, normalize: str) -> dict[str, Any]:
    """What a caller must do before :class:`ServingModel` (its metadata / JSON artifact)."""
    mean, std = normalisation(normalize, bundle.in_channels)
    s = bundle.image_size
    return {
        "input": f"float32 array (N, {bundle.in_channels}, {s}, {s}), pixel values scaled to "
                 "[0, 1] (uint8 / 255), resized to the image size",
        "image_size": s, "channels": bundle.in_channels,
        "mean": mean, "std": std,
        "normalisation": f"{normalize}: (x - mean) / std per channel, applied inside the model",
        "output": "float32 (N, classes): " + ("sigmoid per label" if bundle.task is
                                              TaskType.MULTILABEL else "softmax probabilities"),
        "class_names": list(bundle.class_names), "task": bundle.task.value,
    }


def split_inputs(bundle: DatasetBundle) -> tuple[np.ndarray, np.ndarray]:
    """The test split as the model's input (float [0, 1]) and its labels."""
    split = bundle.test
    if split.images is None:
        raise ValueError("the test split is stored as files: decode it with the dataset's loader")
    return (split.images.float().div(255.0).numpy(), split.labels.numpy())


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, task: TaskType,
             batch_size: int = 256) -> dict[str, float]:
    """The suite's metrics of ``model`` (a :class:`ServingModel`, or the one MLflow loads)."""
    scores = np.concatenate([model(torch.from_numpy(images[i:i + batch_size])).numpy()
                             for i in range(0, len(images), batch_size)])
    return compute_metrics(task, labels, scores)


# -- the selected weights of a cell, kept for export -------------------------------------------------
def selected_path(output_dir: str | Path, config_hash: str) -> Path:
    return Path(output_dir) / "selected-weights" / f"{config_hash}.pt"


def save_selected(output_dir: str | Path, config_hash: str,
                  state: dict[str, torch.Tensor] | None) -> None:
    """Keep a cell's selected checkpoint (atomically: a killed write leaves no half file)."""
    if state is None:
        return
    path = selected_path(output_dir, config_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
    tmp.replace(path)


def load_selected(output_dir: str | Path, config_hash: str) -> dict[str, torch.Tensor] | None:
    path = selected_path(output_dir, config_hash)
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
