"""MedMNIST v2 (2D) adapters: the 12 datasets at 28/64/128/224 px, read from the official npz.

Why read the npz ourselves (not the ``medmnist`` package): we need the arrays as uint8 tensors
(N, C, H, W) and nothing else, offline loading with checks that explain what is wrong with a
file, and an explicit, opt-in acceptance of files whose MD5 is not the official one (a reduced
copy is a different benchmark; the user must say so and is warned).

MedMNIST has no patient ids, so the splits carry no groups and the official train/val/test split
is used as-is. ``subsample_train`` draws a stratified subset of the training split for
small-data experiments (val and test are left whole so scores stay comparable). The subset is
drawn with the loader's ``seed`` argument, which the benchmark leaves at 0: it is one fixed
subset, the same for every strategy and every run seed, as the official split is. A subset per
run seed would make the seeds vary the training images as well as the training noise, so the
spread over seeds (the leaderboard's ± std) would mix the two. From Python,
``load_dataset(..., seed=s)`` draws another subset.
"""

from __future__ import annotations

import functools
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from metalr_bench.datasets.core.base import DatasetBundle, Split, TaskType
from metalr_bench.datasets.core.download import check_md5, download_url
from metalr_bench.datasets.core.errors import CorruptDataError, DatasetError, DatasetNotFoundError
from metalr_bench.datasets.core.medmnist_info import INFO, SIZES, URLS, MedMNISTInfo, npz_name
from metalr_bench.datasets.core.registry import register_dataset
from metalr_bench.datasets.core.splits import stratified_subsample
from pydantic import BaseModel, ConfigDict, Field

SPLITS = ("train", "val", "test")
KEYS = tuple(f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels"))
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


class MedMNISTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subsample_train: int | None = Field(
        None, ge=1, description="keep this many training images: a stratified subset, fixed "
        "(seed 0), so every strategy and every run seed trains on the same images",
    )


def default_root() -> Path:
    """Where the ``medmnist`` package keeps its files, so an existing download is reused."""
    return Path.home() / ".medmnist"


def medmnist_file(
    flag: str, size: int, root: Path | None, *, download: bool, allow_md5_mismatch: bool
) -> tuple[Path, str]:
    """Path of the npz for ``(flag, size)`` (downloaded if asked) and its verified MD5."""
    info = INFO[flag]
    root = Path(root).expanduser() if root is not None else default_root()
    path = root / npz_name(flag, size)
    url, expected = URLS[(flag, size)], info.md5[size]
    if not path.is_file():
        if not download:
            raise DatasetNotFoundError(
                f"MedMNIST file not found: {path}\n"
                f"Put the official file {path.name} into {root} (or point root / --data-root at "
                f"the folder that holds it), or pass download=True (CLI: --download).\n"
                f"  URL: {url}\n"
                f"  expected MD5: {expected}"
            )
        download_url(url, path)
    return path, check_md5(path, expected, allow_mismatch=allow_md5_mismatch)


def _corrupt(path: Path, flag: str, size: int, exc: BaseException) -> CorruptDataError:
    return CorruptDataError(
        f"cannot read {path}: the file is truncated or corrupt ({type(exc).__name__}: {exc}). "
        f"Delete it and download it again (download=True, or from {URLS[(flag, size)]})."
    )


def _images_to_tensor(
    arr: np.ndarray, path: Path, key: str, flag: str, size: int, channels: int
) -> torch.Tensor:
    """(N,H,W) grey or (N,H,W,C) -> uint8 (N,C,H,W), checking size, channels and dtype."""
    if arr.dtype != np.uint8:
        raise CorruptDataError(f"{path}: {key} has dtype {arr.dtype}, expected uint8")
    ok_shape = arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] in (1, 3))
    if not ok_shape or arr.shape[1:3] != (size, size):
        raise CorruptDataError(
            f"{path}: {key} has shape {arr.shape}, expected (N, {size}, {size})"
            f"{'' if channels == 1 else ', 3'} for size={size}; is it the file of another size? "
            f"(the official file for size {size} is {npz_name(flag, size)})"
        )
    got = 1 if arr.ndim == 3 else arr.shape[-1]
    if got != channels:
        raise CorruptDataError(f"{path}: {key} has {got} channel(s), expected {channels}")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.unsqueeze(1) if arr.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


def _labels_to_tensor(
    arr: np.ndarray, path: Path, key: str, n_images: int, info: MedMNISTInfo
) -> torch.Tensor:
    """(N,1) class ids -> int64 (N,); (N,L) 0/1 -> float32 (N,L) for multi-label."""
    n_cls = len(info.labels)
    if len(arr) != n_images:
        raise CorruptDataError(f"{path}: {key} has {len(arr)} labels for {n_images} images")
    if info.task is TaskType.MULTILABEL:
        if arr.ndim != 2 or arr.shape[1] != n_cls:
            raise CorruptDataError(f"{path}: {key} has shape {arr.shape}, expected (N, {n_cls})")
        if not np.isin(arr, (0, 1)).all():
            raise CorruptDataError(f"{path}: {key} holds values other than 0/1")
        return torch.from_numpy(arr.astype(np.float32))
    if arr.ndim > 2 or (arr.ndim == 2 and arr.shape[1] != 1):
        raise CorruptDataError(f"{path}: {key} has shape {arr.shape}, expected (N, 1)")
    y = arr.reshape(-1).astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= n_cls):
        raise CorruptDataError(
            f"{path}: {key} holds class ids {y.min()}..{y.max()}, expected 0..{n_cls - 1}"
        )
    return torch.from_numpy(y)


def read_medmnist_npz(path: Path, flag: str, size: int) -> dict[str, Split]:
    """Read and validate the six arrays of an official MedMNIST npz into three splits."""
    info = INFO[flag]
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise CorruptDataError(
                    f"{path} is missing key(s) {', '.join(missing)} (it has: "
                    f"{', '.join(npz.files) or 'nothing'}); expected the official MedMNIST "
                    f"layout {', '.join(KEYS)}"
                )
            arrays = {k: npz[k] for k in KEYS}
    except CorruptDataError:
        raise
    except _READ_ERRORS as exc:
        raise _corrupt(path, flag, size, exc) from exc
    splits = {}
    for s in SPLITS:
        images = _images_to_tensor(
            arrays[f"{s}_images"], path, f"{s}_images", flag, size, info.channels
        )
        labels = _labels_to_tensor(arrays[f"{s}_labels"], path, f"{s}_labels", len(images), info)
        splits[s] = Split(labels=labels, images=images)
    return splits


def load_medmnist(
    flag: str,
    *,
    root: Path | None,
    size: int,
    seed: int,
    download: bool,
    allow_md5_mismatch: bool,
    subsample_train: int | None = None,
) -> DatasetBundle:
    """Load MedMNIST dataset ``flag`` at ``size`` px from ``root`` (default ``~/.medmnist``)."""
    if flag not in INFO:
        raise DatasetError(f"unknown MedMNIST dataset {flag!r}; known: {', '.join(INFO)}")
    if size not in SIZES:
        raise DatasetError(
            f"MedMNIST {flag} exists at sizes {', '.join(map(str, SIZES))}, not {size}"
        )
    path, md5 = medmnist_file(
        flag, size, root, download=download, allow_md5_mismatch=allow_md5_mismatch
    )
    splits = read_medmnist_npz(path, flag, size)
    train = splits["train"]
    if subsample_train is not None:
        if subsample_train > len(train):
            raise DatasetError(
                f"subsample_train={subsample_train} but {path} has only {len(train)} training "
                "images"
            )
        train = stratified_subsample(train, subsample_train, seed=seed)
    info = INFO[flag]
    return DatasetBundle(
        name=flag,
        task=info.task,
        class_names=list(info.labels),
        in_channels=info.channels,
        image_size=size,
        train=train,
        val=splits["val"],
        test=splits["test"],
        info={
            "source": URLS[(flag, size)],
            "file": str(path),
            "md5": md5,
            "md5_official": str(md5 == info.md5[size]).lower(),
        },
    )


def _register() -> None:
    for flag, info in INFO.items():
        register_dataset(
            flag,
            options=MedMNISTOptions,
            description=f"MedMNIST v2 {flag}: {info.task.value}, {len(info.labels)} classes, "
            f"{info.channels} channel(s), sizes {'/'.join(map(str, SIZES))}",
        )(functools.partial(load_medmnist, flag))


_register()
