"""The bundled synthetic dataset: deterministic, patient-level splits, sane labels."""

from __future__ import annotations

import numpy as np
import torch
from metalr_bench.datasets import TaskType, load_dataset
from metalr_bench.datasets.core.splits import assert_group_disjoint


def test_synthetic_is_deterministic_and_group_disjoint() -> None:
    a = load_dataset("synthetic", size=16, options={"n_patients": 60})
    b = load_dataset("synthetic", size=16, options={"n_patients": 60})
    assert torch.equal(a.train.images, b.train.images)
    assert a.task is TaskType.BINARY and a.class_names == ["benign", "malignant"]
    assert_group_disjoint(a.train, a.val, a.test)
    total = len(a.train) + len(a.val) + len(a.test)
    assert total == 60 * 2
    for split in (a.train, a.val, a.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 16, 16)
        assert set(np.unique(split.labels.numpy())) == {0, 1}  # stratified: both classes


def test_synthetic_source_has_four_classes() -> None:
    src = load_dataset("synthetic-source", size=16, options={"n_images": 80})
    assert src.task is TaskType.MULTICLASS and src.num_outputs == 4
    assert len(src.train) + len(src.val) == 80
