"""The one shape every dataset adapter returns.

Why one shape: the trainer, the metrics and the strategies must not know where the data came
from (MedMNIST npz, an ImageFolder on disk, the synthetic generator). An adapter returns three
splits, the task type and the class names; nothing flows back from the trainer to the data.

A split holds either

* ``images``: a uint8 tensor ``(N, C, H, W)`` small enough to keep in memory (and on the GPU),
  used with the batched :mod:`~metalr_bench.datasets.core.tensors` loader, or
* ``paths``: image files decoded lazily by a ``torch.utils.data.DataLoader`` (large images).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch


class TaskType(StrEnum):
    """MedMNIST's task vocabulary; ordinal regression is scored like multi-class."""

    BINARY = "binary"
    MULTICLASS = "multi-class"
    MULTILABEL = "multi-label"
    ORDINAL = "ordinal"


@dataclass
class Split:
    """One split of a dataset.

    ``labels``: int64 ``(N,)`` for single-label tasks, float32 ``(N, L)`` for multi-label.
    ``groups``: the patient / video / lesion id of each sample where the source has one; the
    splitters use it so that one group never lands on both sides of a split.
    """

    labels: torch.Tensor
    images: torch.Tensor | None = None
    paths: Sequence[str] | None = None
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.paths is None):
            raise ValueError("a Split holds exactly one of `images` (tensor) or `paths` (files)")
        n = len(self.images) if self.images is not None else len(self.paths or [])
        if len(self.labels) != n:
            raise ValueError(f"Split has {n} images but {len(self.labels)} labels")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"Split has {n} images but {len(self.groups)} group ids")
        if self.images is not None and (self.images.dtype != torch.uint8 or self.images.ndim != 4):
            raise ValueError(
                f"Split images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, index: np.ndarray | torch.Tensor) -> Split:
        """The samples at ``index`` (numpy or torch indices), keeping the storage kind."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return Split(
            labels=self.labels[idx],
            images=self.images[idx] if self.images is not None else None,
            paths=[self.paths[i] for i in idx.tolist()] if self.paths is not None else None,
            groups=self.groups[idx.numpy()] if self.groups is not None else None,
        )


#: a class name that names a body side: ``kidney-left``, ``Right lung``, ``left`` (not "leftover")
LATERAL = re.compile(r"(?<![a-z])(left|right)(?![a-z])", re.IGNORECASE)


@dataclass
class DatasetBundle:
    """Train/val/test splits plus what the model and the metrics need to know."""

    name: str
    task: TaskType
    class_names: list[str]
    in_channels: int
    image_size: int
    train: Split
    val: Split
    test: Split
    info: dict[str, str] = field(default_factory=dict)

    @property
    def hflip_safe(self) -> bool:
        """Whether a horizontal flip keeps every label: not when a class name says left or
        right (OrganA/C/SMNIST's femur-, kidney-, lung-left/right; a folder named ``left``),
        where a flipped image would carry the other side's label."""
        return not any(LATERAL.search(n) for n in self.class_names)

    @property
    def num_outputs(self) -> int:
        """Width of the model head: one logit per class (per label for multi-label)."""
        return len(self.class_names)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.task.value}, {self.num_outputs} classes, "
            f"{self.in_channels}x{self.image_size}x{self.image_size}, "
            f"train/val/test = {len(self.train)}/{len(self.val)}/{len(self.test)}"
        )
