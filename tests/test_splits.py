"""Split helpers: stratified subsampling and the vectorised group holdout."""

from __future__ import annotations

import time

import numpy as np
import torch
from metalr_bench.datasets.core.base import Split
from metalr_bench.datasets.core.splits import group_holdout, stratified_subsample


def pool(labels: list[int] | np.ndarray) -> Split:
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return Split(labels=y, images=torch.zeros(len(y), 1, 2, 2, dtype=torch.uint8))


def test_subsample_keeps_rare_classes_and_proportions() -> None:
    s = pool([0] * 90 + [1] * 9 + [2] * 1)
    sub = stratified_subsample(s, 20, seed=0)
    assert torch.bincount(sub.labels).tolist() == [17, 2, 1]
    assert torch.equal(sub.labels, stratified_subsample(s, 20, seed=0).labels)


def test_subsample_multilabel_and_all() -> None:
    y = torch.zeros(30, 3)
    y[:10, 0] = 1
    y[10:15, 2] = 1
    s = Split(labels=y, images=torch.zeros(30, 1, 2, 2, dtype=torch.uint8))
    sub = stratified_subsample(s, 6, seed=1)
    assert len(sub) == 6 and sub.labels[:, 2].sum() >= 1
    assert len(stratified_subsample(s, 30)) == 30


def test_group_holdout_is_fast_for_one_image_groups() -> None:
    s = pool(np.arange(20000) % 3)
    t = time.perf_counter()
    rest, held = group_holdout(s, 0.2, seed=0)
    assert time.perf_counter() - t < 2.0
    assert abs(len(held) - 4000) <= 3 and len(rest) + len(held) == 20000  # rounded per stratum
