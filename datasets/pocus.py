"""The POCUS lung-ultrasound pickle of the public MetaLR code (``pocus``), with its five folds.

Why an adapter of its own: the MetaLR paper's POCUS numbers come from one file,
``pocus_data_all.pkl``, that the MetaLR repository (github.com/Schuture/MetaLR, README "Quick
Start") ships as an archive to unzip into ``MetaLR_POCUS/data``. It holds ``(X, y)``: two lists
of five folds, ``X[i]`` a uint8 array ``(N_i, C, H, W)`` and ``y[i]`` the ``N_i`` labels
(0 covid19, 1 pneumonia, 2 regular, the order of the public code's ``COVIDDataset``). The folds
were drawn by video, so they are kept as they are: fold ``fold`` is the test set, the other four
train, and nothing here ever re-splits them (an image-level re-split would put frames of one
video on both sides).

Validation comes from the four training folds. The pickle stores no video ids, so by default
the held-out part is drawn per image, stratified by label (``val_split: fraction``), and frames
of one video can sit in train and val (the test fold stays video-disjoint); ``val_split:
next_fold`` holds out the whole training fold ``(fold + 1) % 5`` instead, leak-free but with
three folds left to train on. A pickle with a third element, five lists of per-image video ids
``(X, y, groups)``, makes the fraction split group-aware.

The file is read with an unpickler that accepts only numpy arrays, numpy scalars and plain
containers: unpickling arbitrary objects can run code, and the file comes from outside.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from metalr_bench.datasets.core.base import DatasetBundle, Split, TaskType
from metalr_bench.datasets.core.errors import (
    CorruptDataError,
    DatasetError,
    DatasetNotFoundError,
    GroupLeakageError,
)
from metalr_bench.datasets.core.registry import register_dataset
from metalr_bench.datasets.core.splits import assert_group_disjoint, group_holdout
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: the public code's label order (``COVIDDataset.label_name``)
POCUS_CLASSES = ["covid19", "pneumonia", "regular"]
N_FOLDS = 5
DEFAULT_FILE = "pocus_data_all.pkl"
WHERE_TO_GET = (
    "get it from the MetaLR repository (https://github.com/Schuture/MetaLR, README section "
    "'Quick Start': the POCUS dataset archive unzipped into MetaLR_POCUS/data)"
)


class PocusOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = Field(
        DEFAULT_FILE, min_length=1, description="the pickle, relative to `root` or absolute"
    )
    n_folds: int = Field(N_FOLDS, description="the pickle's own folds: always 5")
    fold: int | None = Field(None, ge=0, description="the test fold, 0..4")
    val_fraction: float = Field(
        0.15, gt=0, lt=1 - 1 / N_FOLDS,
        description="share of all images held out for validation, drawn from the four "
        "training folds (val_split: fraction)",
    )
    val_split: Literal["fraction", "next_fold"] = Field(
        "fraction",
        description="fraction: val_fraction of the training folds, stratified by label (by "
        "video where the pickle has group ids); next_fold: the whole fold (fold + 1) % 5",
    )
    split_seed: int | None = Field(0, description="seed of the validation draw; null: run seed")
    class_names: list[str] = Field(
        default_factory=lambda: list(POCUS_CLASSES),
        min_length=2, description="names of labels 0, 1, ... (default: the public code's)",
    )

    @field_validator("n_folds")
    @classmethod
    def _five(cls, v: int) -> int:
        if v != N_FOLDS:
            raise ValueError(f"the POCUS pickle holds exactly {N_FOLDS} folds; n_folds must be 5")
        return v

    @field_validator("class_names")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"class_names must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _fold_in_range(self) -> PocusOptions:
        if self.fold is not None and self.fold >= self.n_folds:
            raise ValueError(f"fold must be in 0..{self.n_folds - 1}, got {self.fold}")
        return self


# -- reading ------------------------------------------------------------------------------------
_NUMPY_MODULES = {
    "numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
    "numpy._core.numeric",
}
_NUMPY_NAMES = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}


class _Refused(pickle.UnpicklingError):
    """The pickle names a class other than numpy's arrays and scalars."""


class _ArraysOnly(pickle.Unpickler):
    """Unpickle numpy arrays and scalars in plain lists/tuples; refuse every other class."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _NUMPY_MODULES and name in _NUMPY_NAMES:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):
                module = "numpy._core." + module.rpartition(".")[2]  # numpy 1 file, numpy 2
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # protocol <= 2 writes bytes through it
            return super().find_class(module, name)
        raise _Refused(f"refusing to load {module}.{name}")


def read_pocus_pickle(path: Path) -> tuple[list[np.ndarray], list[np.ndarray], list | None]:
    """``(X, y, groups)`` of the pickle at ``path``: five image arrays ``(N_i, C, H, W)``, five
    int64 label vectors, and five group-id vectors or None; checked, not re-split."""
    try:
        with path.open("rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()
    except _Refused as exc:
        raise CorruptDataError(
            f"{path} holds more than numpy arrays in lists ({exc}: unpickling other objects "
            "can run code); expected (X, y) as the MetaLR repository writes it"
        ) from None
    except Exception as exc:  # truncated file, not a pickle at all
        raise CorruptDataError(
            f"{path} cannot be read as a pickle ({exc}); {WHERE_TO_GET}"
        ) from None
    if not (isinstance(obj, tuple | list) and len(obj) in (2, 3)):
        raise CorruptDataError(
            f"{path} holds {type(obj).__name__}"
            + (f" of length {len(obj)}" if isinstance(obj, tuple | list) else "")
            + "; expected a pair (X, y) of five-fold lists (or (X, y, groups))"
        )
    parts = list(obj)
    for what, part in zip(("X", "y", "groups"), parts, strict=False):
        if not (isinstance(part, tuple | list) and len(part) == N_FOLDS):
            size = f" of length {len(part)}" if isinstance(part, tuple | list) else ""
            raise CorruptDataError(
                f"{path}: {what} is a {type(part).__name__}{size}; expected a list of "
                f"{N_FOLDS} folds"
            )
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    groups: list[np.ndarray] | None = [] if len(parts) == 3 else None
    for i in range(N_FOLDS):
        try:
            x, y = np.asarray(parts[0][i]), np.asarray(parts[1][i])
        except ValueError as exc:  # ragged: images of several sizes in one fold
            raise CorruptDataError(f"{path}: fold {i} is not one array ({exc})") from None
        if x.ndim != 4 or x.shape[0] == 0 or x.shape[1] not in (1, 3):
            raise CorruptDataError(
                f"{path}: X[{i}] has shape {x.shape}; expected (N, C, H, W) with N >= 1 and C "
                "1 or 3"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise CorruptDataError(
                f"{path}: fold {i} has {len(x)} images but labels of shape {y.shape}"
            )
        if x.dtype != np.uint8:
            if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
                raise CorruptDataError(f"{path}: X[{i}] has dtype {x.dtype}; expected uint8")
            if not np.isfinite(x).all() or x.min() < 0 or x.max() > 255:
                raise CorruptDataError(
                    f"{path}: X[{i}] ({x.dtype}) has values in [{x.min()}, {x.max()}]; expected "
                    "0..255 pixels"
                )
            x = np.rint(x).astype(np.uint8)
        if not (np.issubdtype(y.dtype, np.integer) or (
            np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))
        )):
            raise CorruptDataError(f"{path}: y[{i}] has dtype {y.dtype}; expected integer labels")
        images.append(x)
        labels.append(y.astype(np.int64))
        if groups is not None:
            g = np.asarray(parts[2][i])
            if g.ndim != 1 or len(g) != len(x):
                raise CorruptDataError(
                    f"{path}: fold {i} has {len(x)} images but group ids of shape {g.shape}"
                )
            groups.append(g)
    channels = {x.shape[1] for x in images}
    if len(channels) > 1:
        raise CorruptDataError(f"{path}: the folds have different channel counts {channels}")
    return images, labels, groups


def resize_uint8(x: np.ndarray, size: int, chunk: int = 256) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> uint8 ``(N, C, size, size)`` (bilinear, anti-aliased)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.shape[-2:] == (size, size):
        return t
    out = [
        F.interpolate(part.float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True).round_().clamp_(0, 255).to(torch.uint8)
        for part in t.split(chunk)
    ]
    return torch.cat(out)


# -- the adapter ---------------------------------------------------------------------------------
def _resolve(root: Path | None, file: str) -> Path:
    p = Path(file).expanduser()
    if not p.is_absolute():
        if root is None:
            raise DatasetError(
                f"pocus needs root (the folder holding {file}) or an absolute options.file"
            )
        p = Path(root).expanduser() / p
    return p


@register_dataset(
    "pocus",
    options=PocusOptions,
    description="the public MetaLR code's POCUS pickle (covid19/pneumonia/regular), its own "
    "five folds by video; fold = the test fold",
)
def load_pocus(
    *,
    root: Path | None,
    size: int,
    seed: int,
    download: bool,
    allow_md5_mismatch: bool,
    **options: object,
) -> DatasetBundle:
    """Fold ``fold`` of the pickle as the test set; ``download``/``allow_md5_mismatch`` do not
    apply (the file has no official URL or checksum)."""
    opts = PocusOptions(**options)
    if opts.fold is None:
        raise DatasetError(
            "pocus: give fold 0..4 (options.fold, the test fold); the five folds are the "
            "pickle's own"
        )
    path = _resolve(root, opts.file)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{path} does not exist: {WHERE_TO_GET}, and pass the folder holding "
            f"{path.name} as `root` (or options.file as a path)"
            + ("; download is not available for this file" if download else "")
        )
    images, labels, groups = read_pocus_pickle(path)
    n_classes = len(opts.class_names)
    for i, y in enumerate(labels):
        if y.min() < 0 or y.max() >= n_classes:
            raise CorruptDataError(
                f"{path}: fold {i} has labels in {sorted(set(y.tolist()))}, outside 0..{n_classes - 1} "
                f"of class_names {opts.class_names}"
            )
    if groups is not None:
        fold_of: dict[Any, int] = {}
        for i, g in enumerate(groups):
            for gid in np.unique(g).tolist():
                if fold_of.setdefault(gid, i) != i:
                    raise GroupLeakageError(
                        f"{path}: group {gid!r} is in folds {fold_of[gid]} and {i}; the folds "
                        "must be disjoint by video"
                    )

    def fold_split(i: int) -> Split:
        return Split(labels=torch.from_numpy(labels[i]), images=resize_uint8(images[i], size),
                     groups=groups[i] if groups is not None else None)

    test_fold = opts.fold
    s = opts.split_seed if opts.split_seed is not None else seed
    if opts.val_split == "next_fold":
        val_fold = (test_fold + 1) % N_FOLDS
        train_folds = [i for i in range(N_FOLDS) if i not in (test_fold, val_fold)]
        train = _concat([fold_split(i) for i in train_folds])
        val = fold_split(val_fold)
        how = f"test = fold {test_fold}, val = fold {val_fold}, train = folds {train_folds}"
    else:
        train_folds = [i for i in range(N_FOLDS) if i != test_fold]
        pool = _concat([fold_split(i) for i in train_folds])
        train, val = group_holdout(pool, opts.val_fraction / (1 - 1 / N_FOLDS), seed=s)
        by = "video" if groups is not None else "image (the pickle has no video ids)"
        how = (f"test = fold {test_fold}; train/val = folds {train_folds}, val "
               f"{opts.val_fraction:g} of all images, stratified by label, drawn by {by} "
               f"(seed {s})")
    test = fold_split(test_fold)
    assert_group_disjoint(train, val, test, names=("train", "val", "test"))
    return DatasetBundle(
        name="pocus",
        task=TaskType.BINARY if n_classes == 2 else TaskType.MULTICLASS,
        class_names=list(opts.class_names),
        in_channels=int(images[0].shape[1]),
        image_size=size,
        train=train,
        val=val,
        test=test,
        info={"source": str(path), "split": how, "storage": "memory"},
    )


def _concat(parts: list[Split]) -> Split:
    groups = [p.groups for p in parts]
    return Split(
        labels=torch.cat([p.labels for p in parts]),
        images=torch.cat([p.images for p in parts]),
        groups=np.concatenate(groups) if all(g is not None for g in groups) else None,
    )
