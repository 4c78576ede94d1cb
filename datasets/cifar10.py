"""CIFAR-10 (``cifar10``): a natural-image dataset, and the suite's natural-image pre-training source.

Why: MetaLR's premise (shallow layers carry generic features, deep layers must adapt) needs a start
with generic features; ImageNet cannot be downloaded on offline machines, and a medical source
of another modality did not transfer (issue 36). CIFAR-10 (Krizhevsky 2009: 50,000 train /
10,000 test colour photographs, 32 x 32, 10 classes) is the small stand-in. As a source:
``model.pretrain: {dataset: cifar10, root: ../shared/data}``; as a dataset: ``datasets: [cifar10]``.

Two ways in, in this order:

* the official files, through torchvision's ``CIFAR10`` (the real path): ``root`` holds the
  official python layout ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``,
  ``batches.meta``), or ``download=True`` fetches it into ``root``. torchvision checks every file's
  MD5; ``allow_md5_mismatch`` loads files that differ (with a warning), as for MedMNIST.
* offline, a JPEG export packed as one tar (``cifar10-jpeg.tar.xz`` in ``root``: ``train/<class>/
  *.jpg``, ``test/<class>/*.jpg``), read with :mod:`tarfile` directly (nothing is unpacked by
  hand) and decoded once into a uint8 cache (``<cache_dir>/cifar10-<md5>.npz``, default
  ``~/.cache/metalr-bench``); later loads read the cache (a fraction of a second instead of ~20 s).
  JPEG re-encoding makes its pixels differ slightly from the official arrays, so its MD5 is
  checked against that export's (:data:`JPEG_TAR_MD5`), not torchvision's.

The decoding shows a progress bar (tqdm; silent under ``--no-progress``, which sets
``TQDM_DISABLE``). Images stay RGB: a grey target starts from the RGB checkpoint through the
stem's channel adaptation (:func:`metalr_bench.benchmark.models.zoo.adapt_input_conv`). At a
``size`` other than 32 they are resized (bilinear, antialiased).

Splits: test is the official test split; validation is a stratified ``val_fraction`` of the
official train split, drawn with ``split_seed`` (default 0, fixed, so every strategy and seed
sees the same split, as the other adapters do); ``subsample_train`` keeps a stratified subset of
the rest (a cheaper source).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from metalr_bench.datasets.core.base import DatasetBundle, Split, TaskType
from metalr_bench.datasets.core.download import check_md5
from metalr_bench.datasets.core.errors import (
    ChecksumError,
    CorruptDataError,
    DatasetError,
    DatasetNotFoundError,
    DatasetWarning,
)
from metalr_bench.datasets.core.registry import register_dataset
from metalr_bench.datasets.core.splits import group_holdout, stratified_subsample
from metalr_bench.datasets.core.tv_compat import import_torchvision
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

#: the official class order (``batches.meta``'s ``label_names``; also alphabetical)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
OFFICIAL_FOLDER = "cifar-10-batches-py"
JPEG_TAR = "cifar10-jpeg.tar.xz"
#: MD5 of the JPEG export (../shared/data/README.md); not an official CIFAR-10 file
JPEG_TAR_MD5 = "567cd7f69018e8877592da37959c1aab"
NATIVE = 32


class Cifar10Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the official train split "
                                "held out for validation (stratified)")
    split_seed: int = Field(0, description="seed of the validation split (fixed by default)")
    subsample_train: int | None = Field(
        None, ge=10, description="keep this many training images (stratified, seed 0)")
    cache_dir: Path | None = Field(
        None, description="where the tar's decoded images are cached "
        "(default ~/.cache/metalr-bench)")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "metalr-bench"


# -- the official files, through torchvision -------------------------------------------------------
def _official(root: Path, *, download: bool, allow_md5_mismatch: bool
              ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """(images (N, 32, 32, 3) uint8, labels) per official split, via torchvision's CIFAR10."""
    tv = import_torchvision()
    base = tv.datasets.CIFAR10

    class Lenient(base):  # type: ignore[valid-type]
        """torchvision's CIFAR10, whose MD5 checks only warn (``allow_md5_mismatch``)."""

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            import pickle

            with (Path(self.root) / self.base_folder / self.meta["filename"]).open("rb") as fh:
                data = pickle.load(fh, encoding="latin1")
            self.classes = data[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    cls = Lenient if allow_md5_mismatch else base
    out = {}
    try:
        for name, train in (("train", True), ("test", False)):
            ds = cls(str(root), train=train, download=download)
            out[name] = (np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, np.int64))
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise ChecksumError(
            f"CIFAR-10's official files in {root / OFFICIAL_FOLDER} are missing or not the "
            f"official ones (torchvision: {exc}). Download them again (download=True, CLI "
            "--download), or load them anyway with allow_md5_mismatch=True."
        ) from None
    except (OSError, EOFError, ValueError, KeyError) as exc:
        raise CorruptDataError(
            f"cannot read CIFAR-10's official files in {root / OFFICIAL_FOLDER}: {exc}. "
            "Delete the folder and download it again (download=True)."
        ) from exc
    folder = root / OFFICIAL_FOLDER
    official = not allow_md5_mismatch or all(  # what torchvision checks: every file's MD5
        tv.datasets.utils.check_integrity(str(folder / f), md5)
        for f, md5 in [*base.train_list, *base.test_list, (base.meta["filename"],
                                                           base.meta["md5"])])
    if not official:
        warnings.warn(f"{root / OFFICIAL_FOLDER}: MD5 mismatch with the official CIFAR-10 "
                      "files; loading them anyway because allow_md5_mismatch is set",
                      DatasetWarning, stacklevel=3)
    return out, "official" if official else "official layout, MD5 mismatch"


# -- the JPEG tar, decoded once into a cache -------------------------------------------------------
def _member_split_class(name: str) -> tuple[str, int] | None:
    """``[prefix/]train|test/<class>/<file>.jpg`` -> (split, class id); None for other entries."""
    parts = PurePosixPath(name).parts
    if len(parts) < 3 or parts[-3] not in ("train", "test"):
        return None
    if parts[-2] not in CLASSES:
        raise CorruptDataError(f"{name}: class folder {parts[-2]!r} is not a CIFAR-10 class "
                               f"({', '.join(CLASSES)})")
    return parts[-3], CLASSES.index(parts[-2])


def _quiet() -> bool:
    """``--no-progress`` (``TQDM_DISABLE`` in the environment), read when the bar starts: tqdm
    itself reads it only when imported, which may be before the CLI sets it."""
    return os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")


def decode_tar(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode every image of the JPEG tar, streaming (xz is read once, front to back).

    Within a split the images are ordered by (class, member name), so the arrays, and every split
    drawn from them, do not depend on the tar's member order.
    """
    found: dict[str, list[tuple[int, str, np.ndarray]]] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:*") as tar, tqdm(desc=f"cifar10: decoding {path.name} (once)",
                                                    unit="img", disable=_quiet()) as bar:
            for member in tar:
                if not member.isfile():
                    continue
                where = _member_split_class(member.name)
                if where is None:
                    continue
                fh = tar.extractfile(member)
                assert fh is not None
                try:
                    with Image.open(io.BytesIO(fh.read())) as im:
                        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                except (UnidentifiedImageError, OSError, ValueError) as exc:
                    raise CorruptDataError(f"{path}: cannot decode {member.name}: {exc}") from exc
                if arr.shape != (NATIVE, NATIVE, 3):
                    raise CorruptDataError(f"{path}: {member.name} is {arr.shape[1]}x"
                                           f"{arr.shape[0]}, expected 32x32 (CIFAR-10)")
                found[where[0]].append((where[1], member.name, arr))
                bar.update()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptDataError(f"cannot read {path}: the file is truncated or not a tar "
                               f"({type(exc).__name__}: {exc}); copy it again") from exc
    out = {}
    for split, items in found.items():
        if not items:
            raise CorruptDataError(f"{path} holds no {split}/<class>/*.jpg images; expected the "
                                   "layout train/<class>/NNNN.jpg and test/<class>/NNNN.jpg")
        items.sort(key=lambda t: (t[0], t[1]))
        out[split] = (np.stack([a for _, _, a in items]),
                      np.array([c for c, _, _ in items], dtype=np.int64))
    return out


def _from_tar(path: Path, cache_dir: Path, *, allow_md5_mismatch: bool
              ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str, str]:
    """The tar's arrays, from the cache when this exact file (its MD5) was decoded before."""
    md5 = check_md5(path, JPEG_TAR_MD5, allow_mismatch=allow_md5_mismatch)
    cache = cache_dir / f"cifar10-{md5}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return ({s: (z[f"{s}_images"], z[f"{s}_labels"]) for s in ("train", "test")},
                        md5, str(cache))
        except (OSError, ValueError, KeyError, EOFError):
            cache.unlink(missing_ok=True)  # a broken cache is decoded again, not trusted
    arrays = decode_tar(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{hashlib.md5(str(cache).encode()).hexdigest()[:6]}.npz")
    np.savez(tmp, **{f"{s}_{k}": a for s, (im, y) in arrays.items()
                     for k, a in (("images", im), ("labels", y))})
    tmp.replace(cache)  # atomic: a killed decode never leaves a half-written cache
    return arrays, md5, str(cache)


# -- the adapter -----------------------------------------------------------------------------------
def _to_split(images: np.ndarray, labels: np.ndarray, size: int) -> Split:
    """(N, 32, 32, 3) uint8 -> a uint8 (N, 3, size, size) split."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    if size != NATIVE:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return Split(labels=torch.from_numpy(labels), images=x)


@register_dataset(
    "cifar10",
    options=Cifar10Options,
    description="CIFAR-10, 10 classes of natural RGB images (32 px): official files via "
    f"torchvision (download) or {JPEG_TAR} read offline; a natural-image pre-training source",
)
def load_cifar10(
    *,
    root: Path | None,
    size: int,
    seed: int,
    download: bool,
    allow_md5_mismatch: bool,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    subsample_train: int | None = None,
    cache_dir: Path | None = None,
) -> DatasetBundle:
    """CIFAR-10 at ``size`` px from ``root``: the official files (or ``download``), else the tar.

    ``seed`` is not used: the split has its own ``split_seed``, so every run seed trains on the
    same images.
    """
    if root is None:
        raise DatasetError("cifar10 needs root: the folder holding cifar-10-batches-py/ (the "
                           f"official files, or download=True to fetch them) or {JPEG_TAR}")
    root = Path(root).expanduser()
    tar = root / JPEG_TAR
    if download or (root / OFFICIAL_FOLDER).is_dir() or not tar.is_file():
        if not download and not (root / OFFICIAL_FOLDER).is_dir():
            raise DatasetNotFoundError(
                f"CIFAR-10 not found in {root}: expected {OFFICIAL_FOLDER}/ (the official "
                f"python files) or {JPEG_TAR}. Pass download=True (CLI: --download) to fetch the "
                "official files there, or point root at the folder that holds one of them."
            )
        arrays, how = _official(root, download=download, allow_md5_mismatch=allow_md5_mismatch)
        info = {"source": "torchvision CIFAR10 (" + how + ")", "file": str(root / OFFICIAL_FOLDER)}
    else:
        arrays, md5, cache = _from_tar(tar, cache_dir or default_cache_dir(),
                                       allow_md5_mismatch=allow_md5_mismatch)
        info = {"source": JPEG_TAR, "file": str(tar), "md5": md5, "cache": cache,
                "md5_official": str(md5 == JPEG_TAR_MD5).lower()}
    pool = _to_split(*arrays["train"], size)
    train, val = group_holdout(pool, val_fraction, seed=split_seed)
    if subsample_train is not None:
        if subsample_train > len(train):
            raise DatasetError(f"subsample_train={subsample_train} but CIFAR-10's train split "
                               f"has {len(train)} images after the validation split")
        train = stratified_subsample(train, subsample_train, seed=0)
    return DatasetBundle(
        name="cifar10", task=TaskType.MULTICLASS, class_names=list(CLASSES), in_channels=3,
        image_size=size, train=train, val=val, test=_to_split(*arrays["test"], size),
        info={**info, "split": f"val = {val_fraction:g} of the official train split, "
              f"stratified (seed {split_seed}); test = the official test split"},
    )
