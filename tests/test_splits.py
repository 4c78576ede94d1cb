"""Split helpers: stratified subsampling and the vectorised group holdout."""

from __future__ import annotations

import time

import numpy as np
import pytest
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


@pytest.mark.parametrize("stratify", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2, 7, 123])
def test_group_holdout_keeps_each_group_on_one_side_and_each_image_once(
    seed: int, stratify: bool
) -> None:
    # 60 groups of 1..6 images each, ids not sorted nor contiguous; a group's images share a label
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, size=60)
    gids = rng.permutation(np.arange(1000, 1060) * 7)
    groups = np.repeat(gids, sizes)
    order = rng.permutation(len(groups))  # a group's images are scattered through the split
    groups = groups[order]
    labels = (groups // 7) % 3
    n = len(groups)
    s = Split(labels=torch.as_tensor(labels), groups=groups,
              # each image carries its own index in its pixels, to trace it through subset()
              images=torch.arange(n, dtype=torch.int32).view(n, 1, 1, 1).view(torch.uint8)
              .reshape(n, 1, 2, 2))
    rest, held = group_holdout(s, 0.25, seed=seed, stratify=stratify)
    assert set(rest.groups.tolist()).isdisjoint(held.groups.tolist())
    assert set(rest.groups.tolist()) | set(held.groups.tolist()) == set(gids.tolist())
    assert len(rest) + len(held) == n

    def ids(split: Split) -> list[int]:
        return split.images.reshape(len(split), 4).contiguous().view(torch.int32).view(-1).tolist()

    got = ids(rest) + ids(held)
    assert sorted(got) == list(range(n))  # every image exactly once, none duplicated
    for side in (rest, held):  # images keep their own group and label
        idx = np.asarray(ids(side))
        assert np.array_equal(side.groups, groups[idx])
        assert np.array_equal(side.labels.numpy(), labels[idx])
    # a quarter of the groups (rounded per stratum when stratified)
    assert abs(len(np.unique(held.groups)) - 15) <= (3 if stratify else 0)
