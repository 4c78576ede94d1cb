"""MedMNIST adapter: official npz layout, MD5 handling, download, and clear errors.

The tests write their own small npz files in the official layout; no network is used (the
download test serves a file from a local ``http.server``).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from metalr_bench.datasets import DatasetError, TaskType, available_datasets, load_dataset
from metalr_bench.datasets.core.errors import (
    ChecksumError,
    CorruptDataError,
    DatasetNotFoundError,
)
from metalr_bench.datasets.core.medmnist_info import INFO, SIZES, URLS, npz_name

REPO = Path(__file__).resolve().parents[1]


def write_npz(
    root: Path,
    flag: str,
    size: int,
    counts=(20, 6, 8),
    *,
    drop: tuple[str, ...] = (),
    image_size: int | None = None,
    seed: int = 0,
) -> Path:
    """A small file in the official layout: (N,H,W) grey or (N,H,W,3) RGB, labels (N,1)/(N,L)."""
    info = INFO[flag]
    rng = np.random.default_rng(seed)
    s = image_size or size
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        shape = (n, s, s) if info.channels == 1 else (n, s, s, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if info.task is TaskType.MULTILABEL:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, len(info.labels)), dtype=np.uint8)
        else:
            arrays[f"{split}_labels"] = (
                (np.arange(n) % len(info.labels)).reshape(n, 1).astype(np.uint8)
            )
    for k in drop:
        del arrays[k]
    root.mkdir(parents=True, exist_ok=True)
    path = root / npz_name(flag, size)
    np.savez_compressed(path, **arrays)
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def official(monkeypatch: pytest.MonkeyPatch):
    """Make a test-written file 'official' by putting its MD5 into the table."""

    def accept(flag: str, size: int, path: Path) -> None:
        monkeypatch.setitem(INFO[flag].md5, size, md5(path))

    return accept


def test_all_twelve_registered_with_four_sizes() -> None:
    flags = {
        "pathmnist",
        "chestmnist",
        "dermamnist",
        "octmnist",
        "pneumoniamnist",
        "retinamnist",
        "breastmnist",
        "bloodmnist",
        "tissuemnist",
        "organamnist",
        "organcmnist",
        "organsmnist",
    }
    assert flags <= set(available_datasets())
    assert set(INFO) == flags
    for flag in flags:
        assert set(INFO[flag].md5) == set(SIZES)
        assert all(len(m) == 32 for m in INFO[flag].md5.values())
    assert URLS[("bloodmnist", 64)].endswith("/bloodmnist_64.npz?download=1")
    assert INFO["chestmnist"].task is TaskType.MULTILABEL
    assert INFO["retinamnist"].task is TaskType.ORDINAL
    assert INFO["pneumoniamnist"].labels == ("normal", "pneumonia")


def test_grey_binary_28(tmp_path: Path, official) -> None:
    official("pneumoniamnist", 28, write_npz(tmp_path, "pneumoniamnist", 28))
    b = load_dataset("pneumoniamnist", root=tmp_path, size=28)
    assert b.task is TaskType.BINARY and b.class_names == ["normal", "pneumonia"]
    assert b.in_channels == 1 and b.image_size == 28
    assert b.train.images.shape == (20, 1, 28, 28) and b.train.images.dtype == torch.uint8
    assert b.train.labels.dtype == torch.int64 and b.train.labels.shape == (20,)
    assert (len(b.val), len(b.test)) == (6, 8)
    assert b.info["md5_official"] == "true"


def test_rgb_64_keeps_pixels(tmp_path: Path, official) -> None:
    path = write_npz(tmp_path, "bloodmnist", 64)
    official("bloodmnist", 64, path)
    b = load_dataset("bloodmnist", root=tmp_path, size=64)
    assert b.task is TaskType.MULTICLASS and len(b.class_names) == 8 and b.in_channels == 3
    assert b.test.images.shape == (8, 3, 64, 64)
    raw = np.load(path)["test_images"]
    assert torch.equal(b.test.images, torch.from_numpy(raw).permute(0, 3, 1, 2))


def test_multilabel_chest(tmp_path: Path, official) -> None:
    official("chestmnist", 28, write_npz(tmp_path, "chestmnist", 28))
    b = load_dataset("chestmnist", root=tmp_path)
    assert b.task is TaskType.MULTILABEL and b.num_outputs == 14
    assert b.train.labels.dtype == torch.float32 and b.train.labels.shape == (20, 14)


def test_subsample_train_is_stratified_and_seeded(tmp_path: Path, official) -> None:
    official("pneumoniamnist", 28, write_npz(tmp_path, "pneumoniamnist", 28, counts=(40, 4, 4)))
    a = load_dataset("pneumoniamnist", root=tmp_path, seed=3, options={"subsample_train": 10})
    b = load_dataset("pneumoniamnist", root=tmp_path, seed=3, options={"subsample_train": 10})
    c = load_dataset("pneumoniamnist", root=tmp_path, seed=4, options={"subsample_train": 10})
    assert len(a.train) == 10 and torch.bincount(a.train.labels).tolist() == [5, 5]
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert len(a.val) == 4  # val/test untouched
    with pytest.raises(DatasetError, match="only 40 training images"):
        load_dataset("pneumoniamnist", root=tmp_path, options={"subsample_train": 41})
    with pytest.raises(ValueError):  # pydantic: must be >= 1
        load_dataset("pneumoniamnist", root=tmp_path, options={"subsample_train": 0})


def test_md5_mismatch_is_an_error_unless_allowed(tmp_path: Path) -> None:
    path = write_npz(tmp_path, "pneumoniamnist", 28)
    with pytest.raises(ChecksumError) as exc:
        load_dataset("pneumoniamnist", root=tmp_path)
    msg = str(exc.value)
    assert str(path) in msg and INFO["pneumoniamnist"].md5[28] in msg and md5(path) in msg
    assert "allow_md5_mismatch=True" in msg and "--allow-md5-mismatch" in msg
    with pytest.warns(UserWarning, match="MD5 mismatch.*loading it anyway"):
        b = load_dataset("pneumoniamnist", root=tmp_path, allow_md5_mismatch=True)
    assert len(b.train) == 20 and b.info["md5_official"] == "false"


def test_missing_file_names_path_url_and_md5(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("dermamnist", root=tmp_path, size=128)
    msg = str(exc.value)
    assert str(tmp_path / "dermamnist_128.npz") in msg
    assert URLS[("dermamnist", 128)] in msg and INFO["dermamnist"].md5[128] in msg
    assert "download=True" in msg


def test_unknown_size(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="sizes 28, 64, 128, 224, not 32"):
        load_dataset("pneumoniamnist", root=tmp_path, size=32)


def test_truncated_file_says_redownload(tmp_path: Path, official) -> None:
    path = write_npz(tmp_path, "pneumoniamnist", 28)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    official("pneumoniamnist", 28, path)
    with pytest.raises(CorruptDataError, match="truncated or corrupt.*download it again"):
        load_dataset("pneumoniamnist", root=tmp_path)


def test_missing_keys_are_named(tmp_path: Path, official) -> None:
    path = write_npz(tmp_path, "pneumoniamnist", 28, drop=("val_labels", "test_images"))
    official("pneumoniamnist", 28, path)
    with pytest.raises(CorruptDataError, match="missing key\\(s\\) val_labels, test_images"):
        load_dataset("pneumoniamnist", root=tmp_path)


def test_wrong_image_size(tmp_path: Path, official) -> None:
    path = write_npz(tmp_path, "pneumoniamnist", 64, image_size=28)  # 28 px data, _64 name
    official("pneumoniamnist", 64, path)
    with pytest.raises(CorruptDataError, match=r"shape \(20, 28, 28\), expected \(N, 64, 64\)"):
        load_dataset("pneumoniamnist", root=tmp_path, size=64)


def test_label_count_mismatch(tmp_path: Path, official) -> None:
    path = write_npz(tmp_path, "pneumoniamnist", 28)
    arrays = dict(np.load(path))
    arrays["val_labels"] = arrays["val_labels"][:-1]
    np.savez(path, **arrays)
    official("pneumoniamnist", 28, path)
    with pytest.raises(CorruptDataError, match="val_labels has 5 labels for 6 images"):
        load_dataset("pneumoniamnist", root=tmp_path)


@pytest.fixture
def http_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A folder served on 127.0.0.1 (a random free port) for the download tests."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_fetches_verifies_and_renames(
    tmp_path: Path, http_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, official
) -> None:
    served, base = http_dir
    src = write_npz(served, "breastmnist", 28)
    official("breastmnist", 28, src)
    monkeypatch.setitem(URLS, ("breastmnist", 28), f"{base}/{src.name}?download=1")
    root = tmp_path / "cache"
    with pytest.raises(DatasetNotFoundError):  # download=False never touches the network
        load_dataset("breastmnist", root=root)
    b = load_dataset("breastmnist", root=root, download=True)
    assert len(b.train) == 20 and b.class_names == ["malignant", "normal, benign"]
    assert md5(root / "breastmnist.npz") == md5(src)
    assert os.listdir(root) == ["breastmnist.npz"]  # no temporary file left behind


def test_download_with_wrong_md5(
    tmp_path: Path, http_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, base = http_dir
    src = write_npz(served, "breastmnist", 28)
    monkeypatch.setitem(URLS, ("breastmnist", 28), f"{base}/{src.name}")
    root = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="MD5 mismatch"):
        load_dataset("breastmnist", root=root, download=True)
    with pytest.warns(UserWarning, match="MD5 mismatch"):
        load_dataset("breastmnist", root=root, download=True, allow_md5_mismatch=True)


def test_download_failure_names_url(
    tmp_path: Path, http_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, base = http_dir
    monkeypatch.setitem(URLS, ("breastmnist", 28), f"{base}/absent.npz")
    with pytest.raises(DatasetError, match="could not download .*absent.npz"):
        load_dataset("breastmnist", root=tmp_path / "cache", download=True)
    assert not list((tmp_path / "cache").iterdir())


def _shared_data() -> Path | None:
    candidates = [
        os.environ.get("METALR_BENCH_DATA"),
        REPO.parent / "shared" / "data",
        Path("/work/shared/data"),
    ]
    for c in candidates:
        if c and (Path(c) / "pneumoniamnist.npz").is_file():
            return Path(c)
    return None


@pytest.mark.realdata
def test_real_pneumoniamnist() -> None:
    root = _shared_data()
    if root is None:
        pytest.skip("pneumoniamnist.npz not found (set METALR_BENCH_DATA to its folder)")
    with pytest.warns(UserWarning, match="MD5 mismatch"):
        b = load_dataset("pneumoniamnist", root=root, allow_md5_mismatch=True)
    assert (len(b.train), len(b.val), len(b.test)) == (3882, 524, 624)
    assert b.task is TaskType.BINARY and b.train.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(b.train.labels).tolist() == [388, 3494]
