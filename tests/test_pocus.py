"""The public MetaLR code's data and starting point: the POCUS pickle with its own five folds
(``pocus``) and a USCL-style checkpoint loaded by position. Every file is written here."""

from __future__ import annotations

import pickle
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from metalr_bench.benchmark.config import ConfigError, ModelSpec, validate_config
from metalr_bench.benchmark.models.zoo import (
    USCL_HEAD_PREFIXES,
    WeightsMismatch,
    build_model,
    load_state,
    read_checkpoint,
)
from metalr_bench.benchmark.running.preflight import InputError
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.datasets.core.errors import (
    CorruptDataError,
    DatasetError,
    DatasetNotFoundError,
    GroupLeakageError,
)
from metalr_bench.datasets.core.registry import load_dataset
from metalr_bench.datasets.pocus import POCUS_CLASSES

#: images per fold: unequal on purpose, so a fold is recognisable by its size
FOLD_SIZES = (12, 9, 15, 10, 14)
SIDE = 20


def fake_pickle(path: Path, *, channels: int = 3, sizes=FOLD_SIZES, groups: bool = False,
                seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A pocus_data_all.pkl-shaped file: (X, y), five folds, X[i] uint8 (N, C, H, W)."""
    rng = np.random.default_rng(seed)
    xs = [rng.integers(0, 256, (n, channels, SIDE, SIDE), dtype=np.uint8) for n in sizes]
    ys = [np.arange(n) % 3 for n in sizes]  # every class in every fold
    obj: tuple = (xs, ys)
    if groups:  # two frames per video, videos numbered across folds
        gs, start = [], 0
        for n in sizes:
            gs.append(np.array([f"video{start + j // 2}" for j in range(n)]))
            start += n
        obj = (xs, ys, gs)
    with path.open("wb") as f:
        pickle.dump(obj, f)
    return xs, ys


def _keys(images: torch.Tensor) -> list[bytes]:
    return [img.numpy().tobytes() for img in images]


# -- the dataset -------------------------------------------------------------------------------
def test_fold_is_the_test_set_and_the_rest_train_and_val(tmp_path) -> None:
    xs, ys = fake_pickle(tmp_path / "pocus_data_all.pkl")
    b = load_dataset("pocus", root=tmp_path, size=SIDE, options={"fold": 1})
    assert b.class_names == POCUS_CLASSES == ["covid19", "pneumonia", "regular"]
    assert b.task.value == "multi-class" and b.in_channels == 3 and b.image_size == SIDE
    assert b.hflip_safe
    # the test set is fold 1, exactly and in order
    assert torch.equal(b.test.images, torch.from_numpy(xs[1]))
    assert b.test.labels.tolist() == ys[1].tolist()
    # train + val are the other four folds, each image once, with its label
    rest = {x.tobytes(): int(y) for i in (0, 2, 3, 4) for x, y in zip(xs[i], ys[i], strict=True)}
    train, val, test = _keys(b.train.images), _keys(b.val.images), _keys(b.test.images)
    assert sorted(train + val) == sorted(rest)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert len(train) + len(val) + len(test) == sum(FOLD_SIZES)
    for split, keys in ((b.train, train), (b.val, val)):
        assert split.labels.tolist() == [rest[k] for k in keys]
    # val: 0.15 of all images drawn from the training folds, stratified (every class present)
    assert len(val) == pytest.approx(0.15 * sum(FOLD_SIZES), abs=3)
    assert set(b.val.labels.tolist()) == {0, 1, 2}
    assert "fold 1" in b.info["split"]


def test_folds_are_never_resplit_and_val_can_be_the_next_fold(tmp_path) -> None:
    xs, _ = fake_pickle(tmp_path / "pocus_data_all.pkl")
    for fold in range(5):
        b = load_dataset("pocus", root=tmp_path, size=SIDE, options={"fold": fold})
        assert len(b.test) == FOLD_SIZES[fold]
        assert len(b.train) + len(b.val) == sum(FOLD_SIZES) - FOLD_SIZES[fold]
    b = load_dataset("pocus", root=tmp_path, size=SIDE,
                     options={"fold": 4, "val_split": "next_fold"})
    assert torch.equal(b.test.images, torch.from_numpy(xs[4]))
    assert torch.equal(b.val.images, torch.from_numpy(xs[0]))
    assert torch.equal(b.train.images, torch.from_numpy(np.concatenate(xs[1:4])))
    # the validation draw is seeded: the same split every time, another one with another seed
    a1 = load_dataset("pocus", root=tmp_path, size=SIDE, options={"fold": 0})
    a2 = load_dataset("pocus", root=tmp_path, size=SIDE, options={"fold": 0})
    a3 = load_dataset("pocus", root=tmp_path, size=SIDE, options={"fold": 0, "split_seed": 5})
    assert torch.equal(a1.val.images, a2.val.images)
    assert not torch.equal(a1.val.images, a3.val.images)


def test_resize_keeps_uint8_and_channels(tmp_path) -> None:
    fake_pickle(tmp_path / "pocus_data_all.pkl")
    b = load_dataset("pocus", root=tmp_path, size=8, options={"fold": 2})
    for split in (b.train, b.val, b.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 8, 8)
    grey = tmp_path / "grey"
    grey.mkdir()
    xs, _ = fake_pickle(grey / "mine.pkl", channels=1)
    g = load_dataset("pocus", root=grey, size=32,
                     options={"fold": 0, "file": "mine.pkl", "class_names": ["a", "b", "c"]})
    assert g.in_channels == 1 and g.test.images.shape == (FOLD_SIZES[0], 1, 32, 32)
    assert g.class_names == ["a", "b", "c"]
    # a flat image stays flat through the resize
    flat = tmp_path / "flat.pkl"
    with flat.open("wb") as f:
        pickle.dump(([np.full((2, 3, 30, 30), 77, np.uint8)] * 5, [np.array([0, 1])] * 5), f)
    fl = load_dataset("pocus", size=16, options={"fold": 0, "file": str(flat),
                                                 "val_split": "next_fold"})
    assert (fl.test.images == 77).all()


def test_group_ids_make_val_video_disjoint_and_catch_a_video_in_two_folds(tmp_path) -> None:
    fake_pickle(tmp_path / "pocus_data_all.pkl", groups=True)
    b = load_dataset("pocus", root=tmp_path, size=SIDE, options={"fold": 3})
    assert not set(b.train.groups.tolist()) & set(b.val.groups.tolist())
    assert "video" in b.info["split"]
    xs, ys = fake_pickle(tmp_path / "x.pkl")
    gs = [np.array(["same"] * len(x)) for x in xs]
    with (tmp_path / "leak.pkl").open("wb") as f:
        pickle.dump((xs, ys, gs), f)
    with pytest.raises(GroupLeakageError, match="folds 0 and 1"):
        load_dataset("pocus", root=tmp_path, size=SIDE, options={"fold": 0, "file": "leak.pkl"})


def _dump(path: Path, obj: object) -> Path:
    with path.open("wb") as f:
        pickle.dump(obj, f)
    return path


class NotAnArray:
    pass


def test_clear_errors_for_missing_bad_and_out_of_range(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="MetaLR repository") as exc:
        load_dataset("pocus", root=tmp_path, size=16, options={"fold": 0})
    assert "pocus_data_all.pkl" in str(exc.value)
    with pytest.raises(DatasetError, match="needs root"):
        load_dataset("pocus", size=16, options={"fold": 0})

    xs, ys = fake_pickle(tmp_path / "pocus_data_all.pkl")
    bad = {
        "dict.pkl": ({"X": xs, "y": ys}, "holds dict"),
        "four.pkl": ((xs[:4], ys[:4]), "X is a list of length 4"),
        "labels.pkl": ((xs, [ys[0], ys[1][:-1], *ys[2:]]), "fold 1 has 9 images but labels"),
        "ndim.pkl": (([x[:, 0] for x in xs], ys), r"X\[0\] has shape \(12, 20, 20\)"),
        "range.pkl": (([x.astype(np.int64) * 2 for x in xs], ys), "expected 0..255"),
        "classes.pkl": ((xs, [y + 1 for y in ys]), "outside 0..2"),
        "object.pkl": ((NotAnArray(), ys), "refusing to load"),
        "ragged.pkl": (([[xs[0][0], xs[0][0][:, :5]], *xs[1:]], ys), "fold 0 is not one array"),
    }
    for name, (obj, msg) in bad.items():
        _dump(tmp_path / name, obj)
        with pytest.raises(CorruptDataError, match=msg):
            load_dataset("pocus", root=tmp_path, size=16, options={"fold": 0, "file": name})
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(CorruptDataError, match="cannot be read"):
        load_dataset("pocus", root=tmp_path, size=16, options={"fold": 0, "file": "junk.pkl"})

    with pytest.raises(DatasetError, match="give fold 0..4"):
        load_dataset("pocus", root=tmp_path, size=16)
    for opts, msg in (({"fold": 5}, "fold must be in 0..4"), ({"fold": -1}, "greater than"),
                      ({"fold": 0, "n_folds": 4}, "exactly 5 folds"),
                      ({"fold": 0, "class_names": ["a", "a"]}, "distinct")):
        with pytest.raises(ValueError, match=msg):
            load_dataset("pocus", root=tmp_path, size=16, options=opts)
    with pytest.raises(ConfigError, match="fold must be in 0..4"):
        validate_config({"datasets": [{"adapter": "pocus", "root": str(tmp_path),
                                       "options": {"fold": 7}}]})


# -- the positional checkpoint -----------------------------------------------------------------
def uscl_style(src: torch.nn.Module, head: str) -> dict[str, torch.Tensor]:
    """``src``'s backbone under other names, followed by a projection MLP and classifiers, as
    a USCL checkpoint (``features.*``, ``l1``, ``l2``, ``fc``, ``fc1``, ``fc2``) is laid out."""
    backbone = [(k, v) for k, v in src.state_dict().items() if not k.startswith(head + ".")]
    state = {f"encoder.{i}.{k.rpartition('.')[2]}": v.clone()
             for i, (k, v) in enumerate(backbone)}
    state |= {"l1.weight": torch.randn(8, 8), "l1.bias": torch.randn(8),
              "l2.weight": torch.randn(16, 8), "l2.bias": torch.randn(16),
              "fc.weight": torch.randn(2, 16), "fc.bias": torch.randn(2),
              "fc1.weight": torch.randn(3, 3), "fc2.weight": torch.randn(3, 3)}
    return state


def test_positional_loading_gives_the_backbone_and_a_fresh_head(tmp_path) -> None:
    torch.manual_seed(0)
    src = build_model("resnet18", 3, 3)
    path = tmp_path / "best_model.pth"
    torch.save(uscl_style(src, "fc"), path)
    dst = build_model("resnet18", 3, 3)
    head_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("fc.")}
    with pytest.raises(WeightsMismatch):  # by name it cannot load
        load_state(dst, "resnet18", read_checkpoint(path), str(path))
    load_state(dst, "resnet18", read_checkpoint(path), str(path), mapping="positional")
    theirs, ours = src.state_dict(), dst.state_dict()
    for k, v in ours.items():
        if k.startswith("fc."):
            assert torch.equal(v, head_before[k])  # the head stays freshly initialised
        else:
            assert torch.equal(v, theirs[k]), k
    # a grey-scale target sums the RGB stem filters, as with a checkpoint loaded by name
    grey = build_model("resnet18", 1, 3)
    load_state(grey, "resnet18", read_checkpoint(path), str(path), mapping="positional")
    assert torch.allclose(grey.conv1.weight, theirs["conv1.weight"].sum(1, keepdim=True))
    # a checkpoint of older PyTorch, without BatchNorm's num_batches_tracked, pairs too
    old = {k: v for k, v in read_checkpoint(path).items()
           if not k.endswith("num_batches_tracked")}
    assert len(old) < len(read_checkpoint(path))
    again = build_model("resnet18", 3, 3)
    load_state(again, "resnet18", old, "old.pth", mapping="positional")
    assert torch.equal(again.layer4[1].bn2.running_var, theirs["layer4.1.bn2.running_var"])
    assert USCL_HEAD_PREFIXES == tuple(ModelSpec().drop_prefixes)


def test_positional_mismatch_names_position_keys_and_shapes(tmp_path) -> None:
    state = uscl_style(build_model("resnet18", 3, 3), "fc")
    with pytest.raises(WeightsMismatch) as exc:
        load_state(build_model("resnet50", 3, 3), "resnet50", state, "r18.pth",
                   mapping="positional")
    msg = str(exc.value)
    assert "position 6" in msg and "'encoder.6.weight' (64, 64, 3, 3)" in msg
    assert "'layer1.0.conv1.weight' (64, 64, 1, 1)" in msg and "r18.pth" in msg
    # a projection head left in (not dropped) is one tensor too many
    with pytest.raises(WeightsMismatch, match="first unpaired checkpoint key: 'l1.weight'"):
        load_state(build_model("resnet18", 3, 3), "resnet18", state, "r18.pth",
                   mapping="positional", drop_prefixes=["fc"])
    # too few tensors: the model's first unpaired key is named
    short = dict(list(state.items())[:10])
    with pytest.raises(WeightsMismatch, match="first unpaired model key"):
        load_state(build_model("resnet18", 3, 3), "resnet18", short, "short.pth",
                   mapping="positional")
    with pytest.raises(ValueError, match="positional pairs a checkpoint file"):
        ModelSpec(weights="pretrain", weights_mapping="positional")
    # the mapping is part of the cell's identity (it changes which weights the cell starts from)
    assert ModelSpec(weights="a.pt").model_dump()["weights_mapping"] == "names"
    assert ModelSpec(weights="a.pt", weights_mapping="positional").model_dump()[
        "weights_mapping"] == "positional"


# -- end to end --------------------------------------------------------------------------------
def test_pocus_runs_end_to_end_from_a_positional_checkpoint(tiny_config, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    fake_pickle(data / "pocus_data_all.pkl", sizes=(16, 14, 18, 15, 17))
    dataset = {"adapter": "pocus", "root": str(data), "size": 16, "options": {"fold": 1}}
    tiny_config |= {"datasets": [dataset], "strategies": ["full"], "seeds": [0], "epochs": 1}
    cfg = validate_config(tiny_config)
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed and [r.status for r in outcome.results] == ["FINISHED"]
    assert outcome.results[0].cell.dataset.dataset_name == "pocus-fold1"

    torch.manual_seed(1)
    src = build_model("smallcnn", 3, 3)
    ckpt = tmp_path / "uscl.pth"
    torch.save(uscl_style(src, "head"), ckpt)
    tiny_config |= {"model": {"arch": "smallcnn", "weights": str(ckpt),
                              "weights_mapping": "positional"}}
    cfg = validate_config(tiny_config)
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed and [r.status for r in outcome.results] == ["FINISHED"]
    run = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri).get_run(outcome.results[0].run_id)
    assert run.data.params["model.weights_mapping"] == "positional"

    # by name the same checkpoint is refused in the pre-flight, before any run starts
    tiny_config |= {"model": {"arch": "smallcnn", "weights": str(ckpt)}}
    with pytest.raises(InputError, match="does not match model 'smallcnn'"):
        run_benchmark(validate_config(tiny_config), progress=False)
