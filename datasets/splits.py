"""Group-aware splits: frames of one video (or images of one patient) stay on one side.

Why: POCUS videos, BUSI patients and HAM10000 lesions contribute several near-identical images;
a random image-level split leaks them into the test set and inflates every metric. All splits
here take group ids (falling back to one group per image) and use scikit-learn's group splitters,
stratified on the label when asked and possible.
"""

from __future__ import annotations

import numpy as np
from metalr_bench.datasets.base import Split
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold


def _groups(split: Split) -> np.ndarray:
    return split.groups if split.groups is not None else np.arange(len(split))


def _strat_labels(split: Split) -> np.ndarray:
    y = split.labels.numpy()
    return y if y.ndim == 1 else y.argmax(1)  # multi-label: stratify on the dominant label


def group_kfold_indices(
    split: Split, n_folds: int, *, seed: int = 0, stratify: bool = True
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` (train_idx, held_out_idx) pairs with no group on both sides."""
    groups = _groups(split)
    n_groups = len(np.unique(groups))
    if n_folds < 2 or n_folds > n_groups:
        raise ValueError(
            f"n_folds={n_folds} is invalid for {n_groups} groups: use 2 <= n_folds <= {n_groups}"
        )
    x = np.zeros(len(split))
    if stratify:
        y = _strat_labels(split)
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        folds = list(splitter.split(x, y, groups))
    else:
        rng = np.random.default_rng(seed)
        uniq = np.unique(groups)
        remap = dict(zip(uniq, rng.permutation(len(uniq)), strict=True))
        shuffled = np.array([remap[g] for g in groups])
        folds = list(GroupKFold(n_splits=n_folds).split(x, groups=shuffled))
    return [(np.sort(tr), np.sort(te)) for tr, te in folds]


def group_holdout(
    split: Split, fraction: float, *, seed: int = 0, stratify: bool = True
) -> tuple[Split, Split]:
    """Hold out ``fraction`` of the groups (per label stratum when ``stratify``): (rest, held).

    Groups are drawn whole, so the sizes are exact in groups and close in images.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    groups = _groups(split)
    uniq, inverse = np.unique(groups, return_inverse=True)
    if stratify:
        y = _strat_labels(split)
        # a group's stratum is its most frequent label
        stratum = np.array([np.bincount(y[inverse == i]).argmax() for i in range(len(uniq))])
    else:
        stratum = np.zeros(len(uniq), dtype=np.int64)
    rng = np.random.default_rng(seed)
    held_groups: list[int] = []
    for s in np.unique(stratum):
        members = rng.permutation(np.flatnonzero(stratum == s))
        take = int(round(fraction * len(members)))
        held_groups.extend(members[:take].tolist())
    if not held_groups or len(held_groups) == len(uniq):
        raise ValueError(
            f"cannot hold out {fraction:.0%} of {len(uniq)} groups: one side would be empty"
        )
    held_mask = np.isin(inverse, held_groups)
    return split.subset(np.flatnonzero(~held_mask)), split.subset(np.flatnonzero(held_mask))


def group_train_val_test(
    split: Split,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[Split, Split, Split]:
    """Three group-disjoint splits from one pool."""
    rest, test = group_holdout(split, test_fraction, seed=seed, stratify=stratify)
    train, val = group_holdout(
        rest, val_fraction / (1 - test_fraction), seed=seed + 1, stratify=stratify
    )
    return train, val, test


def assert_group_disjoint(*splits: Split) -> None:
    """Raise if any group id appears in two of ``splits`` (used by adapters and tests)."""
    seen: dict[object, int] = {}
    for i, s in enumerate(splits):
        if s.groups is None:
            continue
        for g in np.unique(s.groups):
            if seen.setdefault(g, i) != i:
                raise ValueError(f"group {g!r} appears in split {seen[g]} and split {i}")
