"""Issue 23 (part B): the layer-wise LR strategies show their mechanism (``lr_spread``), MetaLR's
head pin is a share of the run, which MetaLR runs is named, the ``discriminative`` control, and
the public code's crop with the weights' own normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from metalr_bench.benchmark.perf.bench_throughput import random_bundle
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.trainer import TrainerSettings, TrainResult, seed_everything
from metalr_bench.strategies.core.base import TrainSettings
from metalr_bench.strategies.core.registry import default_strategies, get_strategy
from metalr_bench.strategies.metalr import MetaLR, pinned_epochs

LAYERWISE = ("layer_decay", "auto_rgn", "hd", "metalr", "metalr_public", "discriminative")


def _fit(strategy: str, params: dict, *, epochs: int = 5, lr: float = 1e-3,
         n: int = 64, seed: int = 0) -> tuple[TrainResult, object]:
    bundle = random_bundle(16, n, channels=1)
    seed_everything(seed)
    built = build_parts("smallcnn", 1, 2, strategy, params, TrainSettings(lr=lr, epochs=epochs),
                  bundle=bundle, trainer_settings=TrainerSettings(epochs=epochs, batch_size=16,
                                                                  seed=seed))
    assert built.trainer is not None
    return built.trainer.fit(), built.trainer


# -- lr_spread ------------------------------------------------------------------------------------
def test_layerwise_strategies_log_their_lr_spread() -> None:
    """Every layer-wise LR strategy names ``lr_spread`` as its mechanism and logs it each epoch
    with every group's rate: layer_decay's spread is 1/decay^(G−1) by its formula, and MetaLR's
    starting rates (0.1·lr backbone, lr head) give discriminative a spread of 10."""
    for name in LAYERWISE:
        assert get_strategy(name).mechanism == "lr_spread", name
    result, trainer = _fit("layer_decay", {"decay": 0.5}, epochs=1)
    groups = len(trainer.groups)
    record = result.history[-1]
    assert record["lr_spread"] == pytest.approx(0.5 ** -(groups - 1), rel=1e-12)
    assert {f"lr/{g.name}" for g in trainer.groups} <= set(record)
    result, _ = _fit("discriminative", {}, epochs=1)
    assert result.history[-1]["lr_spread"] == pytest.approx(10.0, rel=1e-6)
    result, _ = _fit("full", {}, epochs=1)
    assert result.history[-1]["lr_spread"] == 1.0


def test_lr_spread_ignores_frozen_groups() -> None:
    from metalr_bench.strategies.core.base import lr_spread

    assert lr_spread([0.0, 1e-4, 1e-3]) == {"lr_spread": pytest.approx(10.0)}
    assert lr_spread([0.0, -1.0]) == {}


# -- the head pin ---------------------------------------------------------------------------------
def test_head_pin_is_the_public_codes_share_of_the_run() -> None:
    """The public code pins the head for 5 of its 30 epochs; a 5-epoch run pins 1, so MetaLR
    learns the head's rate for the other 4 (pinned for 5 epochs, it never did)."""
    assert MetaLR.Params().head_pin_fraction == pytest.approx(5 / 30)
    assert pinned_epochs(5 / 30, None, 30) == 5
    assert pinned_epochs(5 / 30, None, 5) == 1
    assert pinned_epochs(0.0, None, 5) == 0 and pinned_epochs(0.5, 2, 30) == 2
    with pytest.raises(ValueError, match="not both"):
        MetaLR.Params(head_pin_fraction=0.5, head_pin_epochs=2)

    lr = 1e-3
    result, _ = _fit("metalr", {}, epochs=5, lr=lr)
    head = [r["lr/head"] for r in result.history]
    assert [r["head_pinned"] for r in result.history] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert head[0] == pytest.approx(lr, rel=1e-6)
    assert all(not math.isclose(h, lr, rel_tol=1e-6) for h in head[1:])  # learned after the pin

    # metalr_public keeps the code's absolute 5 epochs: in a 5-epoch run the head never learns
    result, _ = _fit("metalr_public", {}, epochs=5, lr=lr)
    assert [r["head_pinned"] for r in result.history] == [1.0] * 5
    assert all(r["lr/head"] == pytest.approx(lr, rel=1e-6) for r in result.history)


# -- which MetaLR runs ---------------------------------------------------------------------------
@pytest.mark.parametrize("source, reference", [("train", "public_code"), ("holdout", "paper"),
                                               ("fixed", "paper"), ("val", "paper")])
def test_meta_reference_names_the_paper_or_the_public_code(source: str, reference: str) -> None:
    result, _ = _fit("metalr", {"meta_source": source}, epochs=1, n=80)
    assert result.data_params()["metalr_meta_reference"] == reference
    assert result.data_params()["meta_source"] == source


def test_meta_reference_of_the_others() -> None:
    assert _fit("metalr_public", {}, epochs=1)[0].data_params()["metalr_meta_reference"] == \
        "public_code"
    for name in ("discriminative", "full"):
        assert _fit(name, {}, epochs=1)[0].data_params()["metalr_meta_reference"] == "none"


# -- discriminative: the control -----------------------------------------------------------------
def test_metalr_without_hyper_gradient_is_discriminative_bit_for_bit() -> None:
    """MetaLR with hyper_lr 0 runs its meta-steps (meta batches from their own loader and
    generator, look-ahead on scratch buffers) but ends with exactly discriminative's weights:
    same starting rates, pin, optimizer, data order."""
    meta, t_meta = _fit("metalr", {"hyper_lr": 0.0}, epochs=2, seed=3)
    disc, t_disc = _fit("discriminative", {}, epochs=2, seed=3)
    assert t_meta.strategy.step == t_disc.strategy.step == 8
    assert float(t_meta.strategy.hypergrad.abs().sum()) > 0  # the meta-steps did run
    assert float(t_disc.strategy.hypergrad.abs().sum()) == 0 and t_disc.meta_split is None
    torch.testing.assert_close(t_meta.strategy.alpha, t_disc.strategy.alpha, rtol=0, atol=0)
    for (n, a), b in zip(t_meta.model.state_dict().items(), t_disc.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), n
    assert [r["train_loss"] for r in meta.history] == [r["train_loss"] for r in disc.history]
    # and with the hyper-gradient on, MetaLR does differ (the comparison measures something)
    learned, t_learned = _fit("metalr", {}, epochs=2, seed=3)
    assert not torch.equal(t_learned.strategy.alpha, t_disc.strategy.alpha)


def test_discriminative_sits_next_to_metalr() -> None:
    grid = default_strategies()
    assert grid.index("discriminative") == grid.index("metalr") + 1
    cls = get_strategy("discriminative")
    assert set(cls.search_space) == set(get_strategy("metalr").search_space) - {"hyper_lr"}
    assert cls.search_space["lr"] == get_strategy("metalr").search_space["lr"]
    assert "MetaLR" in cls.describe()
    with pytest.raises(ValueError, match=r"outside \[lr_min, lr_max\]"):
        _fit("discriminative", {}, lr=0.1, epochs=1)


def test_configs_that_run_metalr_run_discriminative() -> None:
    from pathlib import Path

    import yaml

    for path in sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")):
        names = [s if isinstance(s, str) else s["name"]
                 for s in yaml.safe_load(path.read_text()).get("strategies", [])]
        if "metalr" in names:
            assert "discriminative" in names, path.name


# -- the public code's crop with the weights' normalisation --------------------------------------
def test_metalr_public_crop_pipeline(tiny_config: dict) -> None:
    """`input_pipeline: metalr_public_crop`: the public code's crop (scale 0.8-1, aspect ratio
    0.8-1.25) with the weights' own normalisation; a cell of its own. `metalr_public` has the
    code's aspect range too (it had torchvision's default 3/4-4/3)."""
    from metalr_bench.benchmark.config import validate_config
    from metalr_bench.benchmark.training.cell import trainer_settings
    from metalr_bench.datasets.core.tensors import AugmentSpec, augment_batch

    def opts(pipeline: str, weights: str = "none"):
        cfg = validate_config({**tiny_config, "input_pipeline": pipeline,
                               "model": {"arch": "smallcnn", "weights": weights}})
        o = trainer_settings(cfg, seed=0, epochs=1)
        return cfg, (o.normalize, o.resized_crop, o.crop_ratio)

    crop, public_crop = opts("metalr_public_crop")
    assert public_crop == ("symmetric", (0.8, 1.0), (0.8, 1.25))
    assert opts("metalr_public_crop", "imagenet")[1][0] == "imagenet"
    public, public_opts = opts("metalr_public")
    assert public_opts == ("metalr_public", (0.8, 1.0), (0.8, 1.25))
    suite, suite_opts = opts("suite")
    assert suite_opts[:2] == ("symmetric", None)
    cells = [cfg.cells()[0] for cfg in (crop, public, suite)]
    assert len({cfg.config_hash(c) for cfg, c in zip((crop, public, suite), cells,
                                                      strict=True)}) == 3

    # the aspect ratio of the crops: a constant-gradient image in x and y gives each crop's
    # width and height spans; their ratio lies in [0.8, 1.25] (up to clipping to the image)
    w = 64
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(512, 1, w, w)
    ys = torch.arange(w, dtype=torch.float32).view(1, 1, w, 1).expand(512, 1, w, w)
    g = torch.Generator().manual_seed(0)
    spec = AugmentSpec(hflip=False, resized_crop=(0.8, 1.0), crop_ratio=(0.8, 1.25))
    out = augment_batch(torch.cat([xs, ys], 1), spec, g)
    width = out[:, 0, w // 2, -1] - out[:, 0, w // 2, 0]
    height = out[:, 1, -1, w // 2] - out[:, 1, 0, w // 2]
    ratio = width / height
    assert float(ratio.min()) >= 0.8 - 0.03 and float(ratio.max()) <= 1.25 + 0.03
    g = torch.Generator().manual_seed(0)
    wide = augment_batch(torch.cat([xs, ys], 1), AugmentSpec(hflip=False,
                                                            resized_crop=(0.8, 1.0)), g)
    wratio = (wide[:, 0, w // 2, -1] - wide[:, 0, w // 2, 0]) / (
        wide[:, 1, -1, w // 2] - wide[:, 1, 0, w // 2])
    assert float(wratio.min()) < 0.8 - 0.03 or float(wratio.max()) > 1.25 + 0.03
