"""Checkpoints across channel counts, by hand on a small convolution and through the cached
pre-training checkpoint (``model.weights: pretrain``), and a CIFAR-10 start end to end.

RGB -> grey sums the stem's RGB filters (a grey image is R = G = B, so the summed filter gives the
RGB filter's response to it); grey -> RGB repeats the filter divided by 3 (an RGB image whose
channels are equal then gives the grey filter's response).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from metalr_bench.benchmark.cli import main
from metalr_bench.benchmark.config import PretrainSpec
from metalr_bench.benchmark.models.zoo import adapt_input_conv, read_checkpoint
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.pretrain import pretrained_checkpoint
from metalr_bench.reports import results as res
from metalr_bench.strategies.core.base import TrainSettings
from test_cifar10 import write_tar

# two 1x2 filters over 3 channels: filter 0 = [[1, 2], [3, 4], [5, 6]], filter 1 = negatives
RGB = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]],
                    [[[-1.0, 0.0]], [[0.0, -2.0]], [[4.0, 1.0]]]])
GREY = torch.tensor([[[[3.0, 6.0]]], [[[-3.0, 9.0]]]])


def test_rgb_to_grey_sums_the_filters_by_hand() -> None:
    assert torch.equal(adapt_input_conv(RGB, 1),
                       torch.tensor([[[[9.0, 12.0]]], [[[3.0, -1.0]]]]))
    x = torch.randn(2, 1, 4, 5)  # a grey image seen as R = G = B: the same response
    assert torch.allclose(F.conv2d(x, adapt_input_conv(RGB, 1)),
                          F.conv2d(x.expand(-1, 3, -1, -1), RGB))


def test_grey_to_rgb_repeats_the_filter_divided_by_three_by_hand() -> None:
    want = torch.tensor([[[[1.0, 2.0]], [[1.0, 2.0]], [[1.0, 2.0]]],
                         [[[-1.0, 3.0]], [[-1.0, 3.0]], [[-1.0, 3.0]]]])
    assert torch.equal(adapt_input_conv(GREY, 3), want)
    x = torch.randn(2, 1, 4, 5)
    assert torch.allclose(F.conv2d(x.expand(-1, 3, -1, -1), adapt_input_conv(GREY, 3)),
                          F.conv2d(x, GREY))
    assert adapt_input_conv(GREY, 1) is GREY  # same count: untouched


def _start(arch: str, ckpt: dict, in_channels: int) -> torch.nn.Module:
    built = build_parts(arch, in_channels, 2, "full", None, TrainSettings(lr=1e-3, epochs=1),
                        weights=ckpt, weights_source="pretrain:test")
    return built.model


@pytest.mark.parametrize("in_channels", [1, 3])
def test_a_resnet18_cifar_checkpoint_crosses_channel_counts(in_channels) -> None:
    """MedMNIST's 28-px network through the same cell path, both directions (no training)."""
    src = build_parts("resnet18_cifar", 4 - in_channels, 10, "full", None,
                      TrainSettings(lr=1e-3, epochs=1)).model.state_dict()
    got = _start("resnet18_cifar", src, in_channels).conv1.weight
    want = (src["conv1.weight"].sum(1, keepdim=True) if in_channels == 1
            else src["conv1.weight"].repeat(1, 3, 1, 1) * (1 / 3))
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["smallcnn"])
def test_cached_pretrain_checkpoint_serves_grey_and_rgb_targets(tmp_path, arch) -> None:
    """A CIFAR-10 (RGB) pre-training's cached checkpoint starts a grey and an RGB target; a grey
    source's checkpoint starts an RGB target."""
    write_tar(tmp_path)
    rgb_spec = PretrainSpec(dataset="cifar10", root=str(tmp_path), size=16, epochs=1,
                            batch_size=16, allow_md5_mismatch=True,
                            options={"val_fraction": 0.25, "cache_dir": str(tmp_path / "c")})
    with pytest.warns(UserWarning, match="MD5 mismatch"):
        path = pretrained_checkpoint(arch, rgb_spec, 16, cache_dir=tmp_path / "ck", device="cpu")
    ckpt = read_checkpoint(path)
    stem = "stem.0.weight" if arch == "smallcnn" else "conv1.weight"
    assert ckpt[stem].shape[1] == 3
    grey = dict(_start(arch, ckpt, 1).named_parameters())[stem]
    assert torch.equal(grey, ckpt[stem].sum(1, keepdim=True))
    rgb = dict(_start(arch, ckpt, 3).named_parameters())[stem]
    assert torch.equal(rgb, ckpt[stem])

    grey_spec = PretrainSpec(dataset="synthetic-source", size=16, epochs=1, batch_size=16,
                             options={"n_images": 64})
    path = pretrained_checkpoint(arch, grey_spec, 16, cache_dir=tmp_path / "ck", device="cpu")
    ckpt = read_checkpoint(path)
    assert ckpt[stem].shape[1] == 1
    rgb = dict(_start(arch, ckpt, 3).named_parameters())[stem]
    # x (1/3), as adapt_input_conv computes it, to the last bit
    assert torch.equal(rgb, ckpt[stem].repeat(1, 3, 1, 1) * (1 / 3))


def test_cifar10_start_fine_tunes_a_grey_target_and_the_report_shows_its_worth(
        tiny_config, tmp_path) -> None:
    write_tar(tmp_path)
    cfg = {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1,
           "model": {"arch": "smallcnn", "weights": "pretrain", "pretrain": {
               "dataset": "cifar10", "root": str(tmp_path), "size": 16, "epochs": 1,
               "batch_size": 16, "allow_md5_mismatch": True,
               "options": {"val_fraction": 0.25, "cache_dir": str(tmp_path / "c")}}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    runs = res.load_runs(tiny_config["tracking_uri"], "test")
    assert len(runs.children) == 1  # the grey synthetic target, fine-tuned from the start
    table = res.pretraining_table(tiny_config["tracking_uri"], runs)
    assert table["source"].tolist() == ["cifar10"] and table["model"].tolist() == ["smallcnn"]
    acc = float(table["test_acc"].iloc[0])
    assert 0.0 <= acc <= 1.0 and float(table["seconds"].iloc[0]) > 0
    text = res.pretraining_markdown(table)
    assert f"test accuracy **{acc:.3f}** on the source's own test split" in text
