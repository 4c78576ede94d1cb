"""CIFAR-10 adapter: the official python layout through torchvision, the JPEG tar offline.

The tests write their own tiny files (4 train / 2 test images a class) in both layouts; no
network is used (download=True finds the written, verified files and fetches nothing).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from metalr_bench.datasets import TaskType, available_datasets, load_dataset
from metalr_bench.datasets import cifar10 as C
from metalr_bench.datasets.core.errors import ChecksumError, DatasetNotFoundError
from metalr_bench.datasets.core.tv_compat import import_torchvision
from PIL import Image

N_TRAIN, N_TEST = 4, 2  # per class


def _pixels(cls: int, i: int) -> np.ndarray:
    """A flat colour per image: red = class, green = index (survives JPEG to within a few)."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 20 * cls + 10, 30 * i + 5, 128
    return img


def write_official(root: Path) -> Path:
    """``cifar-10-batches-py/`` as the official python pickles (5 train batches, test, meta)."""
    folder = root / C.OFFICIAL_FOLDER
    folder.mkdir(parents=True)
    train = [(c, i) for c in range(10) for i in range(N_TRAIN)]
    for b in range(5):  # the 40 training images spread over the 5 batches
        part = train[b::5]
        with (folder / f"data_batch_{b + 1}").open("wb") as fh:
            pickle.dump({"data": np.stack([_pixels(c, i).transpose(2, 0, 1).reshape(-1)
                                           for c, i in part]),
                         "labels": [c for c, _ in part]}, fh, protocol=2)
    test = [(c, i) for c in range(10) for i in range(N_TEST)]
    with (folder / "test_batch").open("wb") as fh:
        pickle.dump({"data": np.stack([_pixels(c, i).transpose(2, 0, 1).reshape(-1)
                                       for c, i in test]),
                     "labels": [c for c, _ in test]}, fh, protocol=2)
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({"label_names": list(C.CLASSES), "num_cases_per_batch": 8}, fh, protocol=2)
    return folder


def write_tar(root: Path, *, prefix: str = "cifar10/") -> Path:
    """``cifar10-jpeg.tar.xz``: ``train|test/<class>/NNNN.jpg``, members in a shuffled order."""
    members = [(f"{prefix}{split}/{name}/{i:04d}.jpg", _pixels(c, i))
               for split, n in (("train", N_TRAIN), ("test", N_TEST))
               for c, name in enumerate(C.CLASSES) for i in range(n)]
    order = np.random.default_rng(0).permutation(len(members))
    path = root / C.JPEG_TAR
    with tarfile.open(path, "w:xz") as tar:
        for k in order:
            name, arr = members[k]
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=95)
            info = tarfile.TarInfo(name)
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return path


@pytest.fixture
def official_md5s(monkeypatch, tmp_path: Path):
    """torchvision's MD5 table pointed at the written files, so its strict check passes."""
    cls = import_torchvision().datasets.CIFAR10

    def pin(folder: Path) -> None:
        def md5(name: str) -> str:
            return hashlib.md5((folder / name).read_bytes()).hexdigest()

        monkeypatch.setattr(cls, "train_list", [[f, md5(f)] for f, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[f, md5(f)] for f, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})

    return pin


def _load(root: Path, **kw):
    options = kw.pop("options", {"val_fraction": 0.25, "cache_dir": str(root / "cache")})
    return load_dataset("cifar10", root=root, size=kw.pop("size", 32), options=options, **kw)


def test_registered() -> None:
    assert "cifar10" in available_datasets()


@pytest.mark.parametrize("download", [False, True])
def test_official_layout_through_torchvision(tmp_path: Path, official_md5s, download) -> None:
    official_md5s(write_official(tmp_path))
    b = _load(tmp_path, download=download)  # download=True: verified files, nothing fetched
    assert b.task is TaskType.MULTICLASS and b.class_names == list(C.CLASSES)
    assert b.in_channels == 3 and b.info["source"] == "torchvision CIFAR10 (official)"
    assert (len(b.train), len(b.val), len(b.test)) == (30, 10, 20)
    # stratified: one validation image a class (0.25 of 4); test = the official test split
    assert sorted(b.val.labels.tolist()) == list(range(10))
    assert b.test.labels.tolist() == [c for c in range(10) for _ in range(N_TEST)]
    # pixels exact, channels first (the pickles are CHW rows; torchvision turns them HWC)
    assert torch.equal(b.test.images[3], torch.from_numpy(_pixels(1, 1)).permute(2, 0, 1))


def test_official_files_with_another_md5(tmp_path: Path) -> None:
    write_official(tmp_path)  # torchvision's real MD5 table: the tiny files do not match
    with pytest.raises(ChecksumError, match="allow_md5_mismatch"):
        _load(tmp_path)
    with pytest.warns(UserWarning, match="MD5 mismatch"):
        b = _load(tmp_path, allow_md5_mismatch=True)
    assert len(b.test) == 20 and b.info["source"].endswith("MD5 mismatch)")


def test_tar_read_directly_decoded_once_into_the_cache(tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    write_tar(tmp_path)
    with pytest.warns(UserWarning, match="MD5 mismatch"):  # not the shared export's file
        b = _load(tmp_path, allow_md5_mismatch=True)
    assert "cifar10: decoding" in capsys.readouterr().err  # the progress bar
    assert (len(b.train), len(b.val), len(b.test)) == (30, 10, 20)
    assert sorted(b.val.labels.tolist()) == list(range(10))
    # ordered by (class, name) whatever the tar's order; JPEG keeps a flat colour within a few
    assert b.test.labels.tolist() == [c for c in range(10) for _ in range(N_TEST)]
    want = torch.from_numpy(_pixels(1, 1)).permute(2, 0, 1).int()
    assert (b.test.images[3].int() - want).abs().max() <= 3
    assert Path(b.info["cache"]).is_file() and b.info["md5_official"] == "false"

    def no_decode(path):  # a second load must come from the cache
        raise AssertionError("decoded twice")

    monkeypatch.setattr(C, "decode_tar", no_decode)
    with pytest.warns(UserWarning, match="MD5 mismatch"):
        again = _load(tmp_path, allow_md5_mismatch=True)
    assert torch.equal(again.train.images, b.train.images)
    assert torch.equal(again.val.labels, b.val.labels)


def test_tar_progress_is_silent_under_no_progress(tmp_path: Path, monkeypatch, capsys) -> None:
    write_tar(tmp_path, prefix="")
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what --no-progress sets
    with pytest.warns(UserWarning, match="MD5 mismatch"):
        b = _load(tmp_path, allow_md5_mismatch=True, size=28)
    assert capsys.readouterr().err == ""
    assert tuple(b.train.images.shape[1:]) == (3, 28, 28)  # resized to the asked size


def test_tar_md5_is_checked(tmp_path: Path) -> None:
    write_tar(tmp_path)
    with pytest.raises(ChecksumError, match="allow_md5_mismatch"):
        _load(tmp_path)


def test_missing_files_name_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-batches-py/.*cifar10-jpeg.tar.xz"):
        _load(tmp_path)


def test_subsample_train(tmp_path: Path, official_md5s) -> None:
    official_md5s(write_official(tmp_path))
    b = _load(tmp_path, options={"val_fraction": 0.25, "subsample_train": 20})
    assert len(b.train) == 20 and np.bincount(b.train.labels.numpy()).tolist() == [2] * 10
