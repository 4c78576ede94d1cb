"""Adapters for the user's own data: an ImageFolder tree (``imagefolder``) or a CSV (``csv``).

Why group-aware everything: the small clinical sets this benchmark targets (POCUS videos, BUSI
patients, HAM10000 lesions) hold several near-identical images per video / patient / lesion.
Splitting by image leaks them into the test set, so every split here is drawn by group, stratified
on the label, and checked afterwards; an explicit manifest split is checked for leakage too.

Why the split seed defaults to 0 and not the run seed: comparisons across strategies and seeds
should measure training variance on one fixed split, and the ``n_folds`` folds of a cross
validation only partition the data when all folds are drawn with the same seed.

Images are decoded with PIL (:func:`~metalr_bench.datasets.core.files.decode_image`); up to 128 px they
are decoded once into a uint8 tensor, larger ones stay as paths for the DataLoader path.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from metalr_bench.datasets.core.base import DatasetBundle, Split, TaskType
from metalr_bench.datasets.core.errors import DatasetError
from metalr_bench.datasets.core.files import decode_image, is_grey
from metalr_bench.datasets.core.registry import register_dataset
from metalr_bench.datasets.core.scan import Records, read_manifest, scan_imagefolder
from metalr_bench.datasets.core.splits import (
    assert_group_disjoint,
    group_holdout,
    group_kfold_indices,
    group_train_val_test,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm import tqdm

SPLIT_NAMES = ("train", "val", "test")


class FolderOptions(BaseModel):
    """Options shared by ``imagefolder`` and ``csv``."""

    model_config = ConfigDict(extra="forbid")
    group_pattern: str | None = Field(
        None,
        description="regex over the file's path relative to its class folder (imagefolder) "
        "or its file name (csv without a group column); the named group `group` (else the first "
        "group, else the whole match) is the group id, e.g. '^(?P<group>[^_]+)_'",
    )
    exclude_pattern: str | None = Field(
        None, description="skip files whose path matches (e.g. '_mask')"
    )
    class_names: list[str] | None = Field(None, description="class order (default: sorted)")
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    n_folds: int | None = Field(None, ge=2, description="k-fold CV: fold `fold` is the test set")
    fold: int | None = Field(None, ge=0)
    split_seed: int | None = Field(0, description="seed of the split; null: the run seed")
    task: Literal["auto", "binary", "multi-class", "multi-label", "ordinal"] = "auto"
    in_memory: Literal["auto"] | bool = "auto"
    channels: Literal[1, 3] | None = None

    @field_validator("group_pattern", "exclude_pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FolderOptions:
        if self.fold is not None and self.n_folds is None:
            raise ValueError("fold needs n_folds (k-fold CV); n_folds alone runs every fold")
        if self.n_folds is not None:
            if self.fold is not None and self.fold >= self.n_folds:
                raise ValueError(f"fold must be in 0..{self.n_folds - 1}, got {self.fold}")
            if self.val_fraction >= 1 - 1 / self.n_folds:
                raise ValueError("val_fraction leaves no training data with these n_folds")
        elif self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class CsvOptions(FolderOptions):
    manifest: Path | None = Field(None, description="CSV path (default: <root>/manifest.csv)")
    image_root: Path | None = Field(
        None, description="folder relative image paths start from (default: the manifest's)"
    )
    image_column: str = "image"
    label_column: str = "label"
    group_column: str = "group"
    split_column: str = "split"
    label_separator: str = Field("|", min_length=1)


def _task(rec: Records, task: str) -> TaskType:
    n = len(rec.class_names)
    if rec.multilabel:
        if task not in ("auto", "multi-label"):
            raise DatasetError(f"task={task!r} but the labels are multi-label ('a|b' syntax)")
        return TaskType.MULTILABEL
    if n < 2:
        raise DatasetError(f"need at least 2 classes, found {rec.class_names}")
    if task == "binary" and n != 2:
        raise DatasetError(f"task='binary' but there are {n} classes: {rec.class_names}")
    if task == "multi-label":
        raise DatasetError("task='multi-label' needs labels written as 'a|b' (CSV manifest)")
    if task == "ordinal":
        return TaskType.ORDINAL
    return TaskType.BINARY if n == 2 else TaskType.MULTICLASS


def _split(rec: Records, opts: FolderOptions, seed: int) -> tuple[Split, Split, Split, str]:
    """Train/val/test path splits: the manifest's own, k-fold, or a group holdout."""
    pool = Split(labels=rec.labels, paths=rec.paths, groups=rec.groups)
    s = opts.split_seed if opts.split_seed is not None else seed
    if rec.split is not None:
        if opts.n_folds is not None:
            raise DatasetError("n_folds cannot be combined with a manifest split column")
        parts = {k: pool.subset(np.flatnonzero(rec.split == k)) for k in SPLIT_NAMES}
        for k in ("train", "test"):
            if len(parts[k]) == 0:
                raise DatasetError(f"the manifest's split column assigns no image to {k!r}")
        how = "manifest split column"
        if len(parts["val"]) == 0:
            parts["train"], parts["val"] = group_holdout(parts["train"], opts.val_fraction, seed=s)
            how += f"; val = {opts.val_fraction:g} of the train groups (seed {s})"
        return parts["train"], parts["val"], parts["test"], how
    if opts.n_folds is not None:
        if opts.fold is None:
            raise DatasetError(
                f"n_folds={opts.n_folds} without fold: a benchmark config expands it into one "
                f"cell per fold; to load one fold directly give fold 0..{opts.n_folds - 1}"
            )
        folds = group_kfold_indices(pool, opts.n_folds, seed=s)
        rest_idx, test_idx = folds[opts.fold]
        train, val = group_holdout(
            pool.subset(rest_idx), opts.val_fraction / (1 - 1 / opts.n_folds), seed=s + 1
        )
        return train, val, pool.subset(test_idx), f"fold {opts.fold}/{opts.n_folds} (seed {s})"
    train, val, test = group_train_val_test(
        pool, val_fraction=opts.val_fraction, test_fraction=opts.test_fraction, seed=s
    )
    return (
        train,
        val,
        test,
        f"group holdout val={opts.val_fraction:g} test={opts.test_fraction:g} (seed {s})",
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def decode_split(split: Split, size: int, channels: int, workers: int = 4) -> Split:
    """Decode a path split into a uint8 (N, C, size, size) split (threads: PIL frees the GIL)."""
    assert split.paths is not None
    with ThreadPoolExecutor(workers) as ex:
        it = ex.map(lambda p: decode_image(p, size, channels), split.paths)
        images = list(
            # an explicit `disable=` overrides tqdm's TQDM_DISABLE (what --no-progress sets),
            # so it is read here: the pre-training source's bar printed under --no-progress
            tqdm(it, total=len(split), desc="decode", leave=False,
                 disable=len(split) < 2000 or _env_flag("TQDM_DISABLE"))
        )
    return Split(labels=split.labels, images=torch.stack(images), groups=split.groups)


def build_bundle(
    name: str, rec: Records, opts: FolderOptions, *, size: int, seed: int, source: str
) -> DatasetBundle:
    """Task, channels, splits, leakage check and storage choice, shared by both adapters."""
    task = _task(rec, opts.task)
    channels = opts.channels or (1 if all(is_grey(p) for p in rec.paths) else 3)
    train, val, test, how = _split(rec, opts, seed)
    for k, part in zip(SPLIT_NAMES, (train, val, test), strict=True):
        if len(part) == 0:
            raise DatasetError(f"the {k} split is empty ({how}); use more data or other fractions")
    assert_group_disjoint(train, val, test, names=SPLIT_NAMES)
    in_memory = size <= 128 if opts.in_memory == "auto" else opts.in_memory
    if in_memory:
        train, val, test = (decode_split(p, size, channels) for p in (train, val, test))
    return DatasetBundle(
        name=name,
        task=task,
        class_names=rec.class_names,
        in_channels=channels,
        image_size=size,
        train=train,
        val=val,
        test=test,
        info={"source": source, "split": how, "storage": "memory" if in_memory else "files"},
    )


def _root_name(root: Path | None, options: dict[str, Any]) -> str | None:
    """A folder's datasets are told apart by their root folder's name (``/data/busi`` -> busi)."""
    return Path(root).expanduser().resolve().name if root else None


@register_dataset(
    "imagefolder",
    options=FolderOptions,
    naming=_root_name,
    description="root/<class>/<images>; group-aware stratified splits (group_pattern)",
)
def load_imagefolder(
    *,
    root: Path | None,
    size: int,
    seed: int,
    download: bool,
    allow_md5_mismatch: bool,
    **options: object,
) -> DatasetBundle:
    """An ImageFolder tree; ``download``/``allow_md5_mismatch`` do not apply (local data)."""
    opts = FolderOptions(**options)
    if root is None:
        raise DatasetError("imagefolder needs root (the folder with one sub-folder per class)")
    root = Path(root).expanduser()
    rec = scan_imagefolder(
        root,
        group_pattern=opts.group_pattern,
        exclude_pattern=opts.exclude_pattern,
        class_names=opts.class_names,
    )
    return build_bundle(root.name, rec, opts, size=size, seed=seed, source=str(root))


@register_dataset(
    "csv",
    options=CsvOptions,
    naming=_root_name,
    description="CSV manifest image,label[,group][,split]; multi-label as 'a|b'",
)
def load_csv(
    *,
    root: Path | None,
    size: int,
    seed: int,
    download: bool,
    allow_md5_mismatch: bool,
    **options: object,
) -> DatasetBundle:
    """A manifest CSV; relative ``manifest`` paths start at ``root``, images at the manifest."""
    opts = CsvOptions(**options)
    manifest = opts.manifest
    if manifest is None:
        if root is None:
            raise DatasetError("csv needs options.manifest (or root holding manifest.csv)")
        manifest = Path(root).expanduser() / "manifest.csv"  # root is in it already
    else:
        # only a relative `manifest` option starts at root: the default one above has root in
        # it, and a relative root used to be prefixed twice (data/data/manifest.csv)
        manifest = Path(manifest).expanduser()
        if not manifest.is_absolute() and root is not None:
            manifest = Path(root).expanduser() / manifest
    rec = read_manifest(manifest, opts)
    return build_bundle(
        manifest.parent.name or "csv", rec, opts, size=size, seed=seed, source=str(manifest)
    )
