"""Fair and correct comparisons: strategies run where the model runs, augmentation keeps labels,
every cell starts from a new head, and every strategy trains on the same images."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from metalr_bench.benchmark.perf.bench_throughput import random_bundle
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.trainer import TrainerSettings
from metalr_bench.strategies import TrainSettings, available_strategies, get_strategy


def _tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor a strategy keeps (attributes, lists/tuples/dicts of them, and the attributes
    of the small helper objects it holds, e.g. a regulariser's ``PenaltyMeter``)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 3 or isinstance(obj, torch.nn.Module | torch.optim.Optimizer):
        return []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v, depth + 1)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v, depth + 1)]
    if type(obj).__module__.startswith("metalr_bench.strategies") and hasattr(obj, "__dict__"):
        return [t for v in vars(obj).values() for t in _tensors(v, depth + 1)]
    return []


@pytest.mark.parametrize("name, params", [(n, p) for n in available_strategies()
                                          for p in get_strategy(n).test_params])
def test_every_strategy_derives_its_tensors_where_the_model_trains(name, params) -> None:
    """L2-SP cloned its reference weights w0 while the model was still on the CPU (the trainer
    moved it later), so on CUDA `w - w0` raised and every L2-SP cell failed. CI has no GPU: the
    `meta` device stands in for it. Every strategy is built by the one cell builder, which
    places the model before the strategy sees it; one training step must run there and every
    tensor the strategy keeps must live there too."""
    bundle = random_bundle(16, 64, channels=1)
    built = build_parts("smallcnn", 1, 2, name, params, TrainSettings(), bundle=bundle,
                  trainer_settings=TrainerSettings(epochs=1, batch_size=8, device="meta",
                                                   augment=False, precise_bn=False))
    assert built.trainer is not None
    x, y = next(iter(built.trainer.train_loader))
    try:
        loss = built.trainer.train_step(x, y, epoch=0, step=0)
        assert loss.device.type == "meta"
    except RuntimeError as exc:  # only a host read of a value is impossible on `meta`
        if "cannot be called on meta tensors" not in str(exc):
            raise
    held = _tensors(vars(built.strategy))
    assert held or name in ("full", "last_k", "layer_decay", "lp_ft", "linear_probe", "scratch",
                            "bitfit", "lora")
    wrong = [t.device for t in held if t.device.type != "meta"]
    assert not wrong, f"{name} keeps tensors on {wrong}, away from its model"


# -- label-preserving augmentation ------------------------------------------------------------------
def test_datasets_whose_classes_name_a_side_are_never_flipped() -> None:
    """OrganA/C/SMNIST have femur-, kidney- and lung-left/right classes: a flipped image carries
    the other side's label. The policy comes from the catalogue's class names."""
    from metalr_bench.datasets.core.base import DatasetBundle, Split, TaskType
    from metalr_bench.datasets.core.medmnist_info import INFO

    tiny = Split(labels=torch.zeros(1, dtype=torch.long),
                 images=torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    no_flip = {name for name, info in INFO.items()
               if not DatasetBundle(name, TaskType.MULTICLASS, list(info.labels), 1, 8,
                                    tiny, tiny, tiny).hflip_safe}
    assert no_flip == {"organamnist", "organcmnist", "organsmnist"}
    for names, safe in ((["left", "right"], False), (["Right lung", "other"], False),
                        (["leftover", "bright"], True), (["normal", "pneumonia"], True)):
        assert DatasetBundle("x", TaskType.BINARY, names, 1, 8, tiny, tiny, tiny).hflip_safe is safe


def _sided(n: int, size: int = 16) -> Any:
    """Distinct images with a bright blob on the side their label names (0: left, 1: right)."""
    from metalr_bench.datasets.core.base import DatasetBundle, Split, TaskType

    labels = torch.arange(n) % 2
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, 5:11, (1 if y == 0 else size - 5):(5 if y == 0 else size - 1)] = 255
        images[i, 0, 0, size // 2 - 1: size // 2 + 1] = i  # an id, symmetric: flips keep it
    split = Split(labels=labels, images=images)
    return DatasetBundle("sided", TaskType.BINARY, ["kidney-left", "kidney-right"], 1, size,
                         split, split, split)


@pytest.mark.parametrize("override, flips", [(None, False), (True, True)])
def test_an_augmented_batch_keeps_its_labels(override, flips) -> None:
    """Through the trainer's own loader: every augmented image keeps its blob on its label's
    side, unless the config forces flips (`datasets[].hflip: true`), which must then flip."""
    bundle = _sided(64)
    built = build_parts("smallcnn", 1, 2, "full", {}, TrainSettings(), bundle=bundle,
                  trainer_settings=TrainerSettings(epochs=1, batch_size=16, augment=True,
                                                   hflip=override))
    assert built.trainer is not None
    moved = 0
    for _ in range(3):
        for x, y in built.trainer.train_loader:
            right_half = x[:, 0, :, 8:].sum((1, 2)) > x[:, 0, :, :8].sum((1, 2))
            moved += int((right_half.long() != y).sum())
    assert (moved > 0) is flips


def test_config_hflip_reaches_the_trainer(tiny_config) -> None:
    from metalr_bench.benchmark.config import validate_config
    from metalr_bench.benchmark.training.cell import trainer_settings

    tiny_config["datasets"][0]["hflip"] = False
    cfg = validate_config(tiny_config)
    cell = cfg.cells()[0]
    assert trainer_settings(cfg, seed=0, epochs=1, hflip=cell.dataset.hflip).hflip is False
    on = validate_config({**tiny_config, "datasets": [{**tiny_config["datasets"][0],
                                                         "hflip": True}]})
    assert cfg.config_hash(cell) != on.config_hash(on.cells()[0])


# -- a new head for every cell ------------------------------------------------------------------
def test_a_matching_source_head_is_not_reused(tmp_path) -> None:
    """A 2-class source checkpoint on a 2-class target: the head used to be loaded because its
    shape matched, so a linear probe started from a head trained for other classes."""
    from metalr_bench.benchmark.models.zoo import build_model, load_state, read_checkpoint

    torch.manual_seed(0)
    source = build_model("smallcnn", 1, 2)
    path = tmp_path / "src.pt"
    torch.save({"model": source.state_dict()}, path)
    torch.manual_seed(1)
    target = build_model("smallcnn", 1, 2)
    fresh = target.head.weight.detach().clone()
    load_state(target, "smallcnn", read_checkpoint(path), str(path))
    assert torch.equal(target.head.weight, fresh)  # new head, untouched
    assert torch.equal(target.stem[0].weight, source.stem[0].weight)  # backbone loaded
    kept = build_model("smallcnn", 1, 2)
    load_state(kept, "smallcnn", read_checkpoint(path), str(path), keep_head=True)
    assert torch.equal(kept.head.weight, source.head.weight)  # only when asked


# -- the same training images for every strategy -----------------------------------------------------
def test_metalr_trains_on_every_training_image_by_default(tiny_config) -> None:
    """MetaLR's default used to hold out 20 % of the training set for its meta batches (and
    re-estimate BatchNorm on the rest) while every baseline trained on 100 %. Every run now logs
    what it trained on; the default gives MetaLR the baselines' images."""
    from metalr_bench.benchmark.config import validate_config
    from metalr_bench.benchmark.running.runner import run_benchmark
    from mlflow import MlflowClient

    tiny_config |= {"seeds": [0], "epochs": 1,
                    "strategies": ["full", "metalr",
                                   {"name": "metalr", "params": {"meta_source": "holdout"}}]}
    cfg = validate_config(tiny_config)
    outcome = run_benchmark(cfg, progress=False)
    client = MlflowClient(cfg.tracking_uri)
    logged = {r.cell.strategy_label: client.get_run(r.run_id).data.params for r in outcome.results}
    n = {label: int(p["n_train_images"]) for label, p in logged.items()}
    assert n["metalr"] == n["full"] > n["metalr(meta_source=holdout)"]
    assert n["metalr(meta_source=holdout)"] < 0.9 * n["full"]
    assert logged["full"]["meta_source"] == "none"
    assert logged["metalr"]["meta_source"] == "train"


def test_train_meta_batches_are_fresh_and_unaugmented() -> None:
    """`meta_source: train` draws a new batch of training images at each meta-step (the public
    code's data source without its always-the-first-batch bug), never augmented."""
    bundle = _sided(64)
    built = build_parts("smallcnn", 1, 2, "metalr", {"meta_batch_size": 8}, TrainSettings(),
                  bundle=bundle, trainer_settings=TrainerSettings(epochs=1, batch_size=16,
                                                                  augment=True, hflip=True))
    trainer = built.trainer
    assert trainer is not None and trainer.n_train_images == 64
    originals = {tuple(img.flatten().tolist()) for img in
                 (bundle.train.images.float() / 127.5 - 1.0)}
    seen = []
    for _ in range(6):
        x, _ = next(trainer._meta_iter)
        rows = [tuple(img.flatten().tolist()) for img in x]
        assert all(r in originals for r in rows)  # the stored images, not warped copies
        seen.append(frozenset(rows))
    assert len(set(seen)) > 1  # not always the first batch


# -- input normalisation follows the weights --------------------------------------------------
def test_imagenet_weights_get_imagenet_normalisation(tiny_config) -> None:
    """torchvision's ImageNet weights expect ImageNet's mean/std; every other weight source
    (the suite's own pre-training, random init) trains with [-1, 1]."""
    from metalr_bench.benchmark.config import validate_config
    from metalr_bench.benchmark.training.cell import trainer_settings
    from metalr_bench.datasets.core.tensors import IMAGENET_MEAN, IMAGENET_STD, to_float

    plain = validate_config(tiny_config)
    assert trainer_settings(plain, seed=0, epochs=1).normalize == "symmetric"
    inet = validate_config({**tiny_config, "model": {"arch": "resnet18", "weights": "imagenet"}})
    assert trainer_settings(inet, seed=0, epochs=1).normalize == "imagenet"

    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(to_float(x, normalize="imagenet"), (x / 255.0 - mean) / std)
    torch.testing.assert_close(to_float(x), x / 127.5 - 1.0)
    grey = to_float(x[:, :1], normalize="imagenet")
    torch.testing.assert_close(grey, (x[:, :1] / 255.0 - mean.mean()) / std.mean())


# -- the public MetaLR code's input pipeline as a config choice -------------------------------
def test_metalr_public_input_pipeline(tiny_config) -> None:
    """`input_pipeline: metalr_public`: RandomResizedCrop(0.8-1) + flips (by the dataset's
    policy), mean 0.18 / std 0.24, for every strategy; the suite's pipeline is unchanged."""
    from metalr_bench.benchmark.config import validate_config
    from metalr_bench.benchmark.training.cell import trainer_settings
    from metalr_bench.datasets.core.tensors import AugmentSpec, augment_batch, to_float

    public = validate_config({**tiny_config, "input_pipeline": "metalr_public"})
    pub = trainer_settings(public, seed=0, epochs=1)
    assert (pub.normalize, pub.resized_crop) == ("metalr_public", (0.8, 1.0))
    suite = trainer_settings(validate_config(tiny_config), seed=0, epochs=1)
    assert (suite.normalize, suite.resized_crop) == ("symmetric", None)

    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(to_float(x, normalize="metalr_public"), (x / 255.0 - 0.18) / 0.24)

    # a crop of 80-100 % of the area, resized back: an image whose columns count 0..W-1 keeps
    # its left-to-right order (no flip), spans at least sqrt(0.8 * 3/4) of the width, and a
    # constant image stays constant (no padding enters a crop inside the image)
    w = 32
    ramp = torch.arange(w, dtype=torch.float32).repeat(64, 1, w, 1)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(ramp, AugmentSpec(hflip=False, resized_crop=(0.8, 1.0)), g)
    rows = out[:, 0, w // 2]
    assert bool((rows[:, 1:] >= rows[:, :-1] - 1e-4).all())
    span = (rows[:, -1] - rows[:, 0]) / (w - 1)
    assert float(span.min()) >= (0.8 * 3 / 4) ** 0.5 * 0.9 and float(span.max()) <= 1.0
    flat = augment_batch(torch.full((8, 1, w, w), 0.5), AugmentSpec(resized_crop=(0.8, 1.0)), g)
    torch.testing.assert_close(flat, torch.full_like(flat, 0.5))
    flipped = augment_batch(ramp, AugmentSpec(hflip=True, resized_crop=(0.8, 1.0)), g)[:, 0, w // 2]
    assert bool((flipped[:, 0] > flipped[:, -1]).any())  # flips happen where allowed

    # the side-labelled images keep their labels through the trainer with this pipeline
    bundle = _sided(64)
    built = build_parts("smallcnn", 1, 2, "full", {}, TrainSettings(), bundle=bundle,
                  trainer_settings=TrainerSettings(epochs=1, batch_size=16, augment=True,
                                                   normalize="metalr_public",
                                                   resized_crop=(0.8, 1.0)))
    assert built.trainer is not None
    for xb, yb in built.trainer.train_loader:
        right_half = xb[:, 0, :, 8:].sum((1, 2)) > xb[:, 0, :, :8].sum((1, 2))
        assert bool((right_half.long() == yb).all())
