"""timm backbones (`model.arch: timm:<name>`): the model's own group_matcher() is the grouping.

Tiny timm variants (``test_vit``, ``test_convnext``, ``test_resnet``, a few hundred thousand
weights) keep the training tests at a second or two on CPU; the grouping tests also build the
real small models (ResNet-18, ConvNeXt-Atto, ViT-Tiny, EfficientNet-B0) at 28-32 px.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from metalr_bench.benchmark.config import Cell, ConfigError, PretrainSpec, load_config
from metalr_bench.benchmark.models import zoo
from metalr_bench.benchmark.models.zoo import build_model, load_state
from metalr_bench.benchmark.training import cell as cell_mod
from metalr_bench.strategies import TrainSettings, get_strategy
from metalr_bench.strategies.core.layers import layer_groups, plan_of

ARCHS = [("timm:resnet18", 28), ("timm:convnext_atto", 32), ("timm:vit_tiny_patch16_224", 32),
         ("timm:efficientnet_b0", 32), ("timm:test_vit", 16)]


def _execution_order(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Module paths of the submodules that own parameters directly, in the order they run (the
    root's own parameters, a ViT's ``cls_token`` and ``pos_embed``, join the patch embedding)."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, name=n: order.append(name))
             for n, m in model.named_modules()
             if n and any(True for _ in m.parameters(recurse=False))]  # root: a ViT's cls_token
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return order


@pytest.mark.parametrize(("arch", "size"), ARCHS)
def test_timm_groups_are_timms_own_cover_every_parameter_once_input_to_head(
        arch: str, size: int) -> None:
    group_parameters = zoo.import_timm().models.group_parameters
    torch.manual_seed(0)
    model = build_model(arch, in_channels=1, num_outputs=3, image_size=size)
    groups = layer_groups(model)
    names = [n for n, _ in model.named_parameters()]
    grouped = [p for g in groups for p in g.params]
    assert sorted(grouped) == sorted(names) and len(set(grouped)) == len(grouped)
    # the partition is timm's (the one its layer-wise LR decay uses), in timm's order
    timms = group_parameters(model, model.group_matcher(coarse=False))
    assert [set(g.params) for g in groups] == [set(timms[k]) for k in sorted(timms)]
    # input -> head: the modules run in non-decreasing group order
    group_of = {p: i for i, g in enumerate(groups) for p in g.params}
    order = _execution_order(model, torch.zeros(1, 1, size, size))
    seq = [group_of[next(p for p in names if p.startswith(path + "."))] for path in order]
    assert seq == sorted(seq) and seq[0] == 0 and seq[-1] == len(groups) - 1
    # names: stem first, head last and it holds timm's classifier (the task's new one), unique
    plan = plan_of(model)
    assert groups[0].name == "stem" and groups[-1].name == "head"
    assert len({g.name for g in groups}) == len(groups)
    head = {f"{plan.head}.{n}" for n, _ in model.get_classifier().named_parameters()}
    assert head <= set(groups[-1].params)
    assert model.get_classifier().out_features == 3
    assert plan.head == model.pretrained_cfg["classifier"]
    # grey-scale: the stem convolution takes one channel, and it is in the stem group
    stem = model.get_submodule(plan.stem_conv)
    assert stem.in_channels == 1 and f"{plan.stem_conv}.weight" in groups[0].params
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 3)


def test_a_vit_is_built_for_the_datasets_image_size() -> None:
    model = build_model("timm:test_vit", 1, 2, image_size=16)
    assert model.patch_embed.img_size == (16, 16)
    # convolutional timm models take no img_size (their constructor has none)
    build_model("timm:test_resnet", 1, 2, image_size=16)


def test_unknown_models_are_config_errors_naming_the_choices(tiny_config: dict) -> None:
    tiny_config["model"]["arch"] = "resnet99"
    with pytest.raises(ConfigError, match=r"model.arch.*unknown model 'resnet99'.*smallcnn, "
                       r"resnet18, resnet50, densenet121, resnet18_cifar, resnet50_cifar, timm:<name>"):
        load_config(None, tiny_config)
    tiny_config["model"]["arch"] = "timm:vit_tinyy_patch16_224"
    with pytest.raises(ConfigError, match=r"unknown timm model 'vit_tinyy_patch16_224'"):
        load_config(None, tiny_config)
    tiny_config["model"]["arch"] = "timm:convnext_atto"
    assert load_config(None, tiny_config).model.arch == "timm:convnext_atto"


def test_timm_checkpoint_loads_with_grey_stem_and_a_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_model("timm:test_vit", 3, 10, image_size=16)
    dst = build_model("timm:test_vit", 1, 2, image_size=16)
    head_before = dst.head.weight.clone()
    load_state(dst, "timm:test_vit", src.state_dict(), "src")
    assert torch.equal(dst.blocks[2].attn.qkv.weight, src.blocks[2].attn.qkv.weight)
    assert torch.equal(dst.cls_token, src.cls_token)
    # the RGB patch filters summed for a grey image (R = G = B)
    assert torch.allclose(dst.patch_embed.proj.weight,
                          src.patch_embed.proj.weight.sum(1, keepdim=True))
    assert torch.equal(dst.head.weight, head_before)


def test_imagenet_weights_offline_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    timm = zoo.import_timm()
    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"could not download timm's pre-trained weights for "
                       r"test_vit.*local checkpoint.*weights: pretrain"):
        zoo.imagenet_state("timm:test_vit", 1, 16)


def test_timm_imagenet_path_asks_timm_for_pretrained_weights_sized_for_the_task(
        monkeypatch: pytest.MonkeyPatch) -> None:
    timm = zoo.import_timm()
    real, calls = timm.create_model, []
    monkeypatch.setattr(timm, "create_model",
                        lambda name, **kw: (calls.append(kw), real(name, **{**kw,
                                                                            "pretrained": False}))[1])
    state = zoo.imagenet_state("timm:test_vit", 1, 16)
    assert calls[-1] == {"pretrained": True, "in_chans": 1, "num_classes": 1000, "img_size": 16}
    assert state["patch_embed.proj.weight"].shape[1] == 1
    assert zoo.input_normalisation("timm:test_vit") in ("imagenet", "symmetric")
    assert zoo.input_normalisation("resnet18") == "imagenet"


def _tiny_vit_cfg(tiny_config: dict) -> object:
    tiny_config["model"]["arch"] = "timm:test_vit"
    tiny_config["epochs"] = 1
    return load_config(None, tiny_config)


@pytest.mark.parametrize(("strategy", "params"), [("layer_decay", {"decay": 0.5}),
                                                  ("metalr", {"head_pin_epochs": 0})])
def test_one_epoch_of_layer_wise_strategies_on_a_tiny_vit(
        strategy: str, params: dict, tiny_config: dict) -> None:
    cfg = _tiny_vit_cfg(tiny_config)
    cell = Cell(dataset=cfg.datasets[0], strategy=strategy, params=params, seed=0)
    bundle = cell_mod.DataCache().get(cell)
    built = cell_mod.build_cell(cfg, cell, bundle, None)
    names = [g.name for g in built.groups]
    assert names == ["stem", *[f"blocks.{i}" for i in range(6)], "head"]
    result = built.trainer.fit()
    assert result.best_epoch == 0
    logged = built.strategy.log_values()
    lrs = [logged[f"lr/{n}"] for n in names]
    assert all(torch.isfinite(torch.tensor(lrs)))
    if strategy == "layer_decay":  # lr_g = lr * decay^(n - 1 - g)
        assert lrs == pytest.approx([cfg.lr * 0.5 ** (len(names) - 1 - g)
                                     for g in range(len(names))])


@pytest.mark.parametrize("strategy", ["delta", "surgical", "last_k", "lp_ft", "l2sp"])
def test_group_based_strategies_run_on_timm_groups(strategy: str) -> None:
    """DELTA reads stages from group names, surgical/last_k select groups, LP-FT the head."""
    cls = get_strategy(strategy)
    for arch, size in (("timm:test_vit", 16), ("timm:test_convnext", 32)):
        torch.manual_seed(0)
        model = build_model(arch, 1, 2, image_size=size)
        groups = layer_groups(model)
        strat = cls(dict(cls.test_params[0]) if cls.test_params else None, model, groups,
                    TrainSettings(lr=1e-3, optimizer="sgd", weight_decay=0.0))
        opt = strat.build_optimizer()
        strat.set_train_mode(model)
        x, y = torch.randn(4, 1, size, size), torch.tensor([0, 1, 0, 1])
        loss = torch.nn.functional.cross_entropy(model(x), y)
        extra = strat.loss_term(model)
        (loss if extra is None else loss + extra).backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_pretraining_stage_trains_a_timm_model_that_loads_into_a_grey_target(
        tmp_path: Path) -> None:
    from metalr_bench.benchmark.models.zoo import read_checkpoint
    from metalr_bench.benchmark.training.pretrain import pretrained_checkpoint

    spec = PretrainSpec(epochs=1, batch_size=16, options={"n_images": 64})
    path = pretrained_checkpoint("timm:test_vit", spec, 16, cache_dir=tmp_path, device="cpu")
    assert ":" not in path.name
    state = read_checkpoint(path)
    target = build_model("timm:test_vit", 1, 2, image_size=16)
    load_state(target, "timm:test_vit", state, str(path))
    assert torch.equal(target.blocks[0].mlp.fc1.weight, state["blocks.0.mlp.fc1.weight"])


def test_list_names_the_zoo_and_the_timm_option(capsys: pytest.CaptureFixture[str]) -> None:
    from metalr_bench.benchmark.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "models (model.arch):" in out and "timm:<name>" in out
    assert all(f"  {name}" in out for name in zoo.MODELS)


def test_adding_a_model_is_one_card(tiny_config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A card in the zoo is all a model needs: the config accepts it, layer_groups reads its
    plan, load_state finds its head and stem."""
    from metalr_bench.strategies.core.layers import LayerPlan, attach_plan

    def build(in_channels: int, num_outputs: int, image_size: int | None) -> torch.nn.Module:
        model = torch.nn.Sequential()
        model.add_module("conv", torch.nn.Conv2d(in_channels, 4, 3))
        model.add_module("pool", torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1),
                                                     torch.nn.Flatten()))
        model.add_module("out", torch.nn.Linear(4, num_outputs))
        plan = LayerPlan((("stem", ("conv",)), ("head", ("out",))), head="out", stem_conv="conv")
        return attach_plan(model, plan)

    monkeypatch.setitem(zoo.MODELS, "tiny", zoo.ModelCard("tiny", "a test model", build))
    tiny_config["model"]["arch"] = "tiny"
    assert load_config(None, tiny_config).model.arch == "tiny"
    model = build_model("tiny", 1, 2)
    assert [(g.name, g.params) for g in layer_groups(model)] == [
        ("stem", ("conv.weight", "conv.bias")), ("head", ("out.weight", "out.bias"))]
    src = build_model("tiny", 3, 5)
    load_state(model, "tiny", src.state_dict(), "src")
    assert torch.allclose(model.conv.weight, src.conv.weight.sum(1, keepdim=True))


def test_a_vit_checkpoint_of_another_image_size_loads_with_resampled_position_embeddings() -> None:
    """The pre-training stage's `size` may differ from the target's: the 4x4 patch grid's
    embeddings (64 px, 16-px patches) are resampled to the 2x2 grid (32 px); the class token's
    row is kept. On a ramp along the width: rows stay equal, the ramp keeps its direction and
    (nearly) its mean."""
    torch.manual_seed(0)
    src = build_model("timm:test_vit", 1, 2, image_size=64)
    state = src.state_dict()
    dim = state["pos_embed"].shape[-1]
    ramp = torch.arange(4.0).repeat(4, 1)  # varies along the width only
    state["pos_embed"] = torch.cat([torch.full((1, 1, dim), 7.0),
                                    ramp.reshape(1, 16, 1).expand(1, 16, dim)], 1)
    dst = build_model("timm:test_vit", 1, 2, image_size=32)
    load_state(dst, "timm:test_vit", state, "src")
    pos = dst.pos_embed.detach()
    assert pos.shape == (1, 5, dim) and torch.all(pos[0, 0] == 7.0)
    grid = pos[0, 1:, 0].reshape(2, 2)
    assert torch.allclose(grid[0], grid[1])  # rows equal: no change along the height
    assert grid[0, 0] < grid[0, 1]  # and increasing along the width
    assert float(grid.mean()) == pytest.approx(float(ramp.mean()), abs=0.1)


@pytest.mark.slow
def test_a_timm_vit_runs_through_the_runner_with_transferability_and_drift(
        tiny_config: dict) -> None:
    """The whole path: the pre-training stage, the cell, drift and transferability (whose random
    θ_r must be a ViT of the dataset's image size) over the ViT's own groups."""
    from metalr_bench.benchmark.config import validate_config
    from metalr_bench.benchmark.running.runner import run_benchmark
    from mlflow import MlflowClient

    tiny_config["datasets"][0]["size"] = 32  # a 2x2 grid of 16-px patches
    cfg = validate_config(tiny_config | {
        "model": {"arch": "timm:test_vit", "weights": "pretrain",
                  "pretrain": {"epochs": 1, "options": {"n_images": 64}}},
        "strategies": ["layer_decay"], "seeds": [0], "epochs": 1})
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed, [r.error for r in outcome.failed]
    metrics = MlflowClient(cfg.tracking_uri).get_run(outcome.results[0].run_id).data.metrics
    backbone = ["stem", *[f"blocks.{i}" for i in range(6)]]
    for g in backbone:
        assert math.isfinite(metrics[f"transferability/{g}"])
        assert math.isfinite(metrics[f"drift/{g}"]) and f"lr/{g}" in metrics
    assert "transferability/head" not in metrics and "transferability/mean_backbone" in metrics
