"""Model zoo, layer grouping per family, and loading pre-trained states."""

from __future__ import annotations

import pytest
import torch
from metalr_bench.benchmark.models.zoo import (
    adapt_input_conv,
    build_model,
    load_state,
    read_checkpoint,
)
from metalr_bench.strategies.core.layers import layer_groups


@pytest.mark.parametrize(
    ("arch", "names"),
    [
        ("smallcnn", ["stem", "block1", "block2", "block3", "head"]),
        ("resnet18", ["stem"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
         + ["head"]),
        ("resnet50", ["stem"] + [f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3),
                                                              strict=True) for j in range(n)]
         + ["head"]),
        ("densenet121", ["stem", "denseblock1", "transition1", "denseblock2", "transition2",
                         "denseblock3", "transition3", "denseblock4", "head"]),
    ],
)
def test_layer_groups_cover_every_parameter_once(arch: str, names: list[str]) -> None:
    model = build_model(arch, in_channels=1, num_outputs=3)
    groups = layer_groups(model)
    assert [g.name for g in groups] == names
    all_params = [n for n, _ in model.named_parameters()]
    grouped = [p for g in groups for p in g.params]
    assert sorted(grouped) == sorted(all_params)  # each exactly once
    head = dict(model.named_parameters())[groups[-1].params[0]]
    assert head.shape[0] == 3  # the head is the task's new classifier
    assert groups[0].params[0] in {"conv1.weight", "features.conv0.weight", "stem.0.weight"}


def test_build_adapts_channels_and_head() -> None:
    model = build_model("resnet18", in_channels=1, num_outputs=5)
    out = model(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 5)


def test_adapt_input_conv_sums_rgb_for_grey() -> None:
    w = torch.randn(4, 3, 3, 3)
    assert torch.allclose(adapt_input_conv(w, 1), w.sum(1, keepdim=True))
    w4 = adapt_input_conv(w, 4)
    assert w4.shape == (4, 4, 3, 3)


def test_load_state_keeps_new_head_and_adapts_stem(tmp_path) -> None:
    src = build_model("resnet18", in_channels=3, num_outputs=10)
    path = tmp_path / "src.pt"
    torch.save({"model": src.state_dict()}, path)
    dst = build_model("resnet18", in_channels=1, num_outputs=2)
    head_before = dst.fc.weight.clone()
    load_state(dst, "resnet18", read_checkpoint(path), str(path))
    assert torch.equal(dst.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    assert torch.allclose(dst.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(dst.fc.weight, head_before)


def test_mismatching_checkpoint_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "small.pt"
    torch.save(build_model("smallcnn", 1, 2).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not match model 'resnet18'.*missing keys"):
        load_state(build_model("resnet18", 1, 2), "resnet18", read_checkpoint(path), str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        read_checkpoint(tmp_path / "junk.pt")


# sha256 (first 16 hex digits) of the JSON list [[name, modules, params], ...] of each zoo
# model's layer groups, recorded on the code before the models owned their grouping (class-name
# guessing in strategies/core/layers.py): moving the plans into the zoo must not change one
# group, module path, parameter or their order
_GROUPING_DIGESTS = {
    "smallcnn": "59c87ff847d169fd",
    "resnet18": "941adc861ae92f5f",
    "resnet50": "f70cb414b690ec9b",
    "densenet121": "818f41d69ec09198",
}


@pytest.mark.parametrize("arch", sorted(_GROUPING_DIGESTS))
def test_layer_grouping_is_pinned(arch: str) -> None:
    import hashlib
    import json

    groups = layer_groups(build_model(arch, in_channels=1, num_outputs=3))
    record = [[g.name, list(g.modules), list(g.params)] for g in groups]
    digest = hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]
    assert digest == _GROUPING_DIGESTS[arch]


@pytest.mark.parametrize(("arch", "tv_arch"), [("resnet18_cifar", "resnet18"),
                                               ("resnet50_cifar", "resnet50")])
def test_cifar_resnet_is_medmnists_28px_network(arch: str, tv_arch: str) -> None:
    """MedMNIST's 28-px ResNet: a 3x3 stride-1 stem, no max-pool, so layer4 sees 4x4 at 28 px
    (torchvision's stem leaves 1x1), with resnet18/50's layer groups exactly."""
    model = build_model(arch, in_channels=1, num_outputs=2)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, torch.nn.Identity)
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(l4=o.shape))
    model.eval()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 2)
    assert tuple(seen["l4"][-2:]) == (4, 4)
    ours = [(g.name, g.modules, g.params) for g in layer_groups(model)]
    theirs = [(g.name, g.modules, g.params)
              for g in layer_groups(build_model(tv_arch, in_channels=1, num_outputs=2))]
    assert ours == theirs
    # parameter count: torchvision's less the 7x7 stem plus a 3x3 one (64 filters, 1 channel)
    n = sum(p.numel() for p in model.parameters())
    n_tv = sum(p.numel() for p in build_model(tv_arch, 1, 2).parameters())
    assert n == n_tv - 64 * 49 + 64 * 9


def test_cifar_resnet_refuses_an_imagenet_stem_checkpoint() -> None:
    src = build_model("resnet18", in_channels=3, num_outputs=10).state_dict()
    with pytest.raises(ValueError, match=r"resnet18_cifar.*shape mismatch: conv1.weight"):
        load_state(build_model("resnet18_cifar", 3, 2), "resnet18_cifar", src, "src.pt")
