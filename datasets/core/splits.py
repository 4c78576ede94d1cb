"""Group-aware splits: frames of one video (or images of one patient) stay on one side.

Why: POCUS videos, BUSI patients and HAM10000 lesions contribute several near-identical images;
a random image-level split leaks them into the test set and inflates every metric. All splits
here take group ids (falling back to one group per image) and use scikit-learn's group splitters,
stratified on the label when asked and possible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from metalr_bench.datasets.core.base import Split
from metalr_bench.datasets.core.errors import DatasetError, GroupLeakageError
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
        raise DatasetError(
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
        # a group's stratum is its most frequent label (one vectorised (group, label) count table,
        # not a scan of all images per group: that was quadratic for one-image groups)
        counts = np.zeros((len(uniq), int(y.max()) + 1), dtype=np.int64)
        np.add.at(counts, (inverse, y), 1)
        stratum = counts.argmax(1)
    else:
        stratum = np.zeros(len(uniq), dtype=np.int64)
    rng = np.random.default_rng(seed)
    held_groups: list[int] = []
    for s in np.unique(stratum):
        members = rng.permutation(np.flatnonzero(stratum == s))
        take = int(round(fraction * len(members)))
        held_groups.extend(members[:take].tolist())
    if not held_groups or len(held_groups) == len(uniq):
        raise DatasetError(
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


def assert_group_disjoint(*splits: Split, names: Sequence[str] | None = None) -> None:
    """Raise if any group id appears in two of ``splits`` (used by adapters and tests).

    ``names`` (e.g. ``("train", "val", "test")``) only make the message clearer.
    """
    label = list(names) if names is not None else [f"split {i}" for i in range(len(splits))]
    seen: dict[object, int] = {}
    for i, s in enumerate(splits):
        if s.groups is None:
            continue
        for g in np.unique(s.groups).tolist():  # python scalars: readable in the message
            if seen.setdefault(g, i) != i:
                raise GroupLeakageError(
                    f"group {g!r} appears in both {label[seen[g]]} and {label[i]}: images of one "
                    "patient / video / lesion must stay on one side of a split"
                )


def stratified_subsample(split: Split, n: int, *, seed: int = 0) -> Split:
    """``n`` samples of ``split`` with the label proportions kept, for small-data experiments.

    Every class present gets at least one sample when ``n`` allows it (a class missing from a
    tiny training set would make its metrics undefined). Multi-label rows are stratified on their
    first positive label (all-negative rows form their own stratum). The result keeps the
    original order of the samples, so it is the same tensor slice for the same ``seed``.
    """
    total = len(split)
    if not 1 <= n <= total:
        raise DatasetError(f"cannot subsample {n} of {total} samples: use 1 <= n <= {total}")
    y = split.labels.numpy()
    if y.ndim == 2:
        y = np.where(y.any(1), y.argmax(1) + 1, 0)
    strata, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    alloc = np.ones(len(strata), np.int64) if n >= len(strata) else np.zeros(len(strata), np.int64)
    cap = counts - alloc
    rest = n - int(alloc.sum())
    quota = rest * cap / max(int(cap.sum()), 1)
    alloc += np.floor(quota).astype(np.int64)
    rng = np.random.default_rng(seed)
    left = n - int(alloc.sum())
    if left:  # largest remainders first, ties broken at random but reproducibly
        frac = quota - np.floor(quota) + rng.random(len(strata)) * 1e-9
        frac[alloc >= counts] = -1
        alloc[np.argsort(-frac)[:left]] += 1
    picked = [
        rng.choice(np.flatnonzero(inverse == s), size=int(k), replace=False)
        for s, k in enumerate(alloc)
    ]
    return split.subset(np.sort(np.concatenate(picked)))
