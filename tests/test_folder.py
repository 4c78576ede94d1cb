"""ImageFolder and CSV adapters: group-aware splits, k-fold, manifests, errors, lazy loading."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from metalr_bench.datasets import DatasetError, TaskType, load_dataset
from metalr_bench.datasets.core.errors import CorruptDataError, GroupLeakageError
from metalr_bench.datasets.core.splits import assert_group_disjoint
from metalr_bench.datasets.core.tensors import AugmentSpec, make_loader
from PIL import Image

PATTERN = r"^(?P<group>[^_]+)_"
CLASSES = ("benign", "malignant")


def make_folder(
    root: Path,
    classes=CLASSES,
    videos: int = 6,
    frames: int = 4,
    mode: str = "L",
    sizes=((40, 32),),
) -> list[Path]:
    """root/<class>/<class[:3]><video>_frame<k>.png: ``videos`` groups of ``frames`` per class."""
    rng = np.random.default_rng(0)
    files = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for v in range(videos):
            for f in range(frames):
                w, h = sizes[(v + f) % len(sizes)]
                shape = (h, w) if mode == "L" else (h, w, 3)
                p = root / c / f"{c[:3]}{v:02d}_frame{f:03d}.png"
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(p)
                files.append(p)
    return files


def group_set(split) -> set[str]:
    return set(split.groups.tolist())


def test_imagefolder_holdout_is_group_disjoint_and_complete(tmp_path: Path) -> None:
    files = make_folder(tmp_path / "us")
    b = load_dataset(
        "imagefolder",
        root=tmp_path / "us",
        size=16,
        options={"group_pattern": PATTERN, "in_memory": False},
    )
    assert b.task is TaskType.BINARY and b.class_names == list(CLASSES) and b.in_channels == 1
    parts = (b.train, b.val, b.test)
    assert_group_disjoint(*parts)
    used = [p for s in parts for p in s.paths]
    assert sorted(used) == sorted(str(f.resolve()) for f in files)  # every image exactly once
    assert len(group_set(b.train) | group_set(b.val) | group_set(b.test)) == 12
    for s in parts:  # stratified: both classes everywhere
        assert set(s.labels.tolist()) == {0, 1}
        # all 4 frames of a video stay together
        _, counts = np.unique(s.groups, return_counts=True)
        assert (counts == 4).all()


def test_imagefolder_in_memory_and_seeds(tmp_path: Path) -> None:
    make_folder(tmp_path / "us", sizes=((40, 32), (20, 50)))  # mixed sizes are resized
    opts = {"group_pattern": PATTERN}
    a = load_dataset("imagefolder", root=tmp_path / "us", size=24, seed=1, options=opts)
    assert a.train.images.shape[1:] == (1, 24, 24) and a.train.images.dtype == torch.uint8
    assert len(a.train) + len(a.val) + len(a.test) == 48
    b = load_dataset("imagefolder", root=tmp_path / "us", size=24, seed=2, options=opts)
    assert group_set(a.test) == group_set(b.test)  # split_seed=0: split fixed across run seeds
    runs = {
        frozenset(
            group_set(
                load_dataset(
                    "imagefolder",
                    root=tmp_path / "us",
                    size=24,
                    seed=s,
                    options={**opts, "split_seed": None},
                ).test
            )
        )
        for s in range(4)
    }
    assert len(runs) > 1  # split_seed=None follows the run seed


def test_kfold_test_parts_partition_groups(tmp_path: Path) -> None:
    make_folder(tmp_path / "us")
    tests = []
    for fold in range(3):
        b = load_dataset(
            "imagefolder",
            root=tmp_path / "us",
            size=16,
            options={"group_pattern": PATTERN, "n_folds": 3, "fold": fold},
        )
        assert_group_disjoint(b.train, b.val, b.test)
        assert len(b.train) + len(b.val) + len(b.test) == 48
        tests.append(group_set(b.test))
    assert set().union(*tests) == group_set(b.train) | group_set(b.val) | group_set(b.test)
    assert sum(len(t) for t in tests) == 12  # disjoint and covering


def test_kfold_options_are_validated(tmp_path: Path) -> None:
    make_folder(tmp_path / "us")
    with pytest.raises(ValueError, match="fold needs n_folds"):
        load_dataset("imagefolder", root=tmp_path / "us", options={"fold": 1})
    with pytest.raises(DatasetError, match="one cell per fold"):  # a config expands it
        load_dataset("imagefolder", root=tmp_path / "us", options={"n_folds": 3})
    with pytest.raises(ValueError, match="fold must be in 0..2"):
        load_dataset("imagefolder", root=tmp_path / "us", options={"n_folds": 3, "fold": 3})
    with pytest.raises(ValueError, match="group_pattern"):
        load_dataset("imagefolder", root=tmp_path / "us", options={"group_pattern": "("})


def test_rgb_detection_and_channel_override(tmp_path: Path) -> None:
    make_folder(tmp_path / "derm", mode="RGB", videos=4, frames=2)
    b = load_dataset("imagefolder", root=tmp_path / "derm", size=16)
    assert b.in_channels == 3 and b.train.images.shape[1] == 3
    g = load_dataset("imagefolder", root=tmp_path / "derm", size=16, options={"channels": 1})
    assert g.in_channels == 1 and g.train.images.shape[1] == 1


def test_16bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    make_folder(tmp_path / "ct", videos=3, frames=2)
    img = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(img).save(tmp_path / "ct" / "benign" / "ben99_frame000.png")
    from metalr_bench.datasets.core.files import decode_image

    x = decode_image(str(tmp_path / "ct" / "benign" / "ben99_frame000.png"), 8, 1)
    assert x.shape == (1, 8, 8) and int(x[0, 0, 0]) == 128


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    make_folder(tmp_path / "us")
    (tmp_path / "us" / "normal").mkdir()
    (tmp_path / "us" / "normal" / "notes.txt").write_text("no images here")
    with pytest.raises(
        DatasetError, match=f"class folder {tmp_path / 'us' / 'normal'} holds no images"
    ):
        load_dataset("imagefolder", root=tmp_path / "us")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    make_folder(tmp_path / "us")
    bad = tmp_path / "us" / "benign" / "ben77_frame000.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(CorruptDataError, match=f"cannot read image {bad}"):
        load_dataset(
            "imagefolder", root=tmp_path / "us", size=16, options={"group_pattern": PATTERN}
        )


def test_unmatched_group_pattern_is_an_error(tmp_path: Path) -> None:
    make_folder(tmp_path / "us")
    Image.new("L", (8, 8)).save(tmp_path / "us" / "benign" / "nounderscore.png")
    with pytest.raises(DatasetError, match="does not match 'nounderscore.png'"):
        load_dataset("imagefolder", root=tmp_path / "us", options={"group_pattern": PATTERN})


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def manifest_rows(files: list[Path], root: Path, *, split_of=None) -> list[dict[str, str]]:
    rows = []
    for f in files:
        row = {
            "image": f.relative_to(root).as_posix(),
            "label": f.parent.name,
            "group": f.name.split("_")[0],
        }
        if split_of is not None:
            row["split"] = split_of(f)
        rows.append(row)
    return rows


def test_csv_with_group_column(tmp_path: Path) -> None:
    files = make_folder(tmp_path / "img", videos=5, frames=3)
    m = write_manifest(tmp_path / "meta.csv", manifest_rows(files, tmp_path))
    b = load_dataset("csv", size=16, options={"manifest": str(m)})
    assert b.class_names == list(CLASSES) and b.task is TaskType.BINARY
    assert_group_disjoint(b.train, b.val, b.test)
    assert len(b.train) + len(b.val) + len(b.test) == 30
    # relative manifest path resolved against root; image_root for images elsewhere
    rows = [
        {**r, "image": Path(r["image"]).relative_to("img").as_posix()}
        for r in manifest_rows(files, tmp_path)
    ]
    write_manifest(tmp_path / "m2.csv", rows)
    b2 = load_dataset(
        "csv", root=tmp_path, size=16, options={"manifest": "m2.csv", "image_root": "img"}
    )
    assert torch.equal(b.test.images, b2.test.images)


def test_csv_explicit_split_is_used_and_checked(tmp_path: Path) -> None:
    files = make_folder(tmp_path / "img", videos=5, frames=3)

    def split_of(f: Path) -> str:
        v = int(f.name[3:5])
        return "train" if v < 3 else ("val" if v == 3 else "test")

    m = write_manifest(tmp_path / "m.csv", manifest_rows(files, tmp_path, split_of=split_of))
    b = load_dataset("csv", size=16, options={"manifest": str(m)})
    assert (len(b.train), len(b.val), len(b.test)) == (18, 6, 6)
    assert b.info["split"] == "manifest split column"

    def leaky(f: Path) -> str:  # frame 0 of video 4 goes to train, the rest to test
        return "train" if f.name.endswith("frame000.png") and "04_" in f.name else split_of(f)

    m = write_manifest(tmp_path / "leak.csv", manifest_rows(files, tmp_path, split_of=leaky))
    with pytest.raises(GroupLeakageError, match="group 'ben04' appears in both train and test"):
        load_dataset("csv", size=16, options={"manifest": str(m)})


def test_csv_multilabel_int_labels_and_ordinal(tmp_path: Path) -> None:
    files = make_folder(tmp_path / "img", videos=5, frames=2)
    labels = ["a|b", "b", "", "a|c", "c"]
    rows = [{"image": str(f), "label": labels[i % 5]} for i, f in enumerate(files)]
    b = load_dataset(
        "csv", size=16, options={"manifest": str(write_manifest(tmp_path / "ml.csv", rows))}
    )
    assert b.task is TaskType.MULTILABEL and b.class_names == ["a", "b", "c"]
    assert b.train.labels.dtype == torch.float32 and b.train.labels.shape[1] == 3

    rows = [{"image": str(f), "label": str(i % 3)} for i, f in enumerate(files)]
    m = write_manifest(tmp_path / "ord.csv", rows)
    o = load_dataset("csv", size=16, options={"manifest": str(m), "task": "ordinal"})
    assert o.task is TaskType.ORDINAL and o.class_names == ["0", "1", "2"]
    with pytest.raises(DatasetError, match="task='binary' but there are 3 classes"):
        load_dataset("csv", size=16, options={"manifest": str(m), "task": "binary"})


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    files = make_folder(tmp_path / "img", videos=3, frames=2)
    rows = manifest_rows(files, tmp_path)
    rows[3]["image"] = "img/benign/missing.png"
    m = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(DatasetError, match=r"m.csv:5: image .*missing.png does not exist"):
        load_dataset("csv", options={"manifest": str(m)})
    write_manifest(tmp_path / "cols.csv", [{"path": "x.png", "dx": "nv"}])
    with pytest.raises(DatasetError, match="lacks column\\(s\\) image, label"):
        load_dataset("csv", options={"manifest": str(tmp_path / "cols.csv")})


@pytest.mark.parametrize("augment", [None, AugmentSpec()])
def test_lazy_paths_match_in_memory(tmp_path: Path, augment: AugmentSpec | None) -> None:
    make_folder(tmp_path / "us", mode="RGB", sizes=((40, 32), (33, 33)))
    opts = {"group_pattern": PATTERN}
    mem = load_dataset(
        "imagefolder", root=tmp_path / "us", size=32, options={**opts, "in_memory": True}
    )
    lazy = load_dataset(
        "imagefolder", root=tmp_path / "us", size=32, options={**opts, "in_memory": False}
    )
    assert lazy.train.paths is not None and mem.train.images is not None
    kw = {"shuffle": True, "seed": 5, "augment": augment, "image_size": 32, "in_channels": 3}
    a = list(make_loader(mem.train, 7, **kw))
    b = list(make_loader(lazy.train, 7, **kw))
    assert len(a) == len(b) == len(make_loader(lazy.train, 7, **kw)) == -(-len(mem.train) // 7)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 32, 32)
        assert torch.equal(ya, yb) and torch.allclose(xa, xb)


def test_file_loader_workers_and_resume(tmp_path: Path) -> None:
    make_folder(tmp_path / "us", videos=3, frames=3)
    lazy = load_dataset("imagefolder", root=tmp_path / "us", size=16, options={"in_memory": False})
    loader = make_loader(lazy.train, 4, shuffle=True, seed=1, num_workers=2, image_size=16)
    state = loader.state_dict()
    first = [y for _, y in loader]
    loader.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in loader], strict=True))
    assert sorted(torch.cat(first).tolist()) == sorted(lazy.train.labels.tolist())
