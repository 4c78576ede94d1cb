"""The architectures: one :class:`ModelCard` per model and the functions that build them.

torchvision ResNet-18/50 and DenseNet-121 with the input channels and head adapted to the task,
MedMNIST's 28-px ResNets, ``smallcnn`` (a 4-block CNN) that keeps CPU tests fast, and any timm
model as ``timm:<name>`` (its card made on demand by :func:`get_card`). A card says how to build
the model, where its ImageNet weights come from, the input normalisation they expect and any
fix-up a checkpoint needs before loading (a timm ViT's position embeddings, resampled here beside
the card that uses them). Imports :mod:`.plans` (every built model carries its plan); the
weights (:mod:`.weights`) import this module, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from metalr_bench.benchmark.models.plans import (
    _densenet_plan,
    _resnet_plan,
    _smallcnn_plan,
    timm_plan,
)
from metalr_bench.benchmark.models.tv_compat import import_torchvision
from metalr_bench.strategies.core.layers import LayerPlan, attach_plan
from torch import nn

#: ``model.arch`` prefix that selects a timm model (``timm:convnext_atto``)
TIMM_PREFIX = "timm:"

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelCard:
    """One architecture: everything the suite knows about it, in one place.

    ``build(in_channels, num_outputs, image_size)`` returns a randomly initialised model with its
    :class:`LayerPlan` attached; ``imagenet(in_channels, image_size)`` its ImageNet state
    (``None``: none published); ``normalize`` the input normalisation those weights expect
    (``imagenet`` mean/std, or ``symmetric``: [-1, 1]); ``adapt_state(state, model)`` its own
    fix-ups of a checkpoint before :func:`load_state` compares shapes (a timm ViT resamples its
    position embeddings to the model's patch grid).
    """

    name: str
    description: str
    build: Callable[[int, int, int | None], nn.Module]
    imagenet: Callable[[int, int | None], State] | None = None
    normalize: str = "imagenet"
    adapt_state: Callable[[State, nn.Module], State] | None = None


class SmallCNN(nn.Sequential):
    """A small VGG-like CNN (stem, 3 blocks, head): a cheap stand-in for tests on CPU."""

    def __init__(self, in_channels: int = 1, num_outputs: int = 2, width: int = 16) -> None:
        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        super().__init__()
        self.add_module("stem", nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ))
        self.add_module("block1", block(width, width * 2))
        self.add_module("block2", block(width * 2, width * 4))
        self.add_module("block3", block(width * 4, width * 8))
        self.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        self.add_module("head", nn.Linear(width * 8, num_outputs))


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _torchvision(arch: str, plan_of_model: Callable[[nn.Module], LayerPlan], weights: str,
                 description: str) -> ModelCard:
    """A torchvision classifier with its stem convolution taking ``in_channels`` and a new
    linear head."""

    def build(in_channels: int, num_outputs: int, image_size: int | None) -> nn.Module:
        model = getattr(import_torchvision().models, arch)(weights=None)
        plan = plan_of_model(model)
        assert plan.stem_conv is not None
        conv: nn.Conv2d = model.get_submodule(plan.stem_conv)
        if in_channels != conv.in_channels:
            _set(model, plan.stem_conv, nn.Conv2d(
                in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                bias=conv.bias is not None,
            ))
        head: nn.Linear = model.get_submodule(plan.head)
        _set(model, plan.head, nn.Linear(head.in_features, num_outputs))
        return attach_plan(model, plan)

    def imagenet(in_channels: int, image_size: int | None) -> State:
        w = getattr(import_torchvision().models, weights).IMAGENET1K_V1
        try:
            return w.get_state_dict(progress=True)
        except Exception as exc:  # offline: URLError, OSError, ...
            raise RuntimeError(
                f"could not download ImageNet weights for {arch} from {w.url} ({exc}). "
                "Offline? Put the file in the torch hub cache (~/.cache/torch/hub/checkpoints), "
                "pass a local checkpoint as `model.weights: /path/to.pt`, or use "
                "`weights: pretrain`."
            ) from exc

    return ModelCard(arch, description, build, imagenet)


def _cifar_resnet(arch: str, description: str) -> ModelCard:
    """MedMNIST's 28-px ResNet (MedMNIST/experiments ``MedMNIST2D/models.py``, itself the CIFAR
    ResNet): torchvision's ``arch`` with a 3x3 stride-1 stem and no max-pool, so a 28-px input
    reaches ``layer4`` as 4x4 (torchvision's ImageNet stem leaves it 1x1). Written here on
    torchvision's blocks rather than copied: the same layers in the same order (BasicBlock /
    Bottleneck with the stride on the 3x3 convolution, 1x1 conv + BN shortcuts), and the global
    average pool equals MedMNIST's ``avg_pool2d(out, 4)`` at 28 px. Module names are
    torchvision's (``conv1``, ``bn1``, ``layer1..4``, ``fc``), so the layer plan, the groups and
    every strategy are those of ``resnet18``/``resnet50``; only the stem's weight shape differs
    (3x3), so a checkpoint of the ImageNet-stem network does not load into it (a clear
    mismatch error). No ImageNet weights exist for it. About 5x the compute of ``resnet18`` per
    28-px step on a CPU (the issue's figure: 0.738 s against 0.135 s at batch 64)."""
    base = _torchvision(arch, _resnet_plan, "", description)

    def build(in_channels: int, num_outputs: int, image_size: int | None) -> nn.Module:
        model = base.build(in_channels, num_outputs, image_size)
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, stride=1, padding=1,
                                bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
        return model

    return ModelCard(f"{arch}_cifar", description, build, None, normalize="symmetric")


def _smallcnn(in_channels: int, num_outputs: int, image_size: int | None) -> nn.Module:
    model = SmallCNN(in_channels, num_outputs)
    return attach_plan(model, _smallcnn_plan(model))


#: the zoo: adding a model is one entry here (timm models need none: ``timm:<name>``)
MODELS: dict[str, ModelCard] = {c.name: c for c in (
    ModelCard("smallcnn", "4-block CNN (stem, 3 blocks, head), for fast CPU tests", _smallcnn),
    _torchvision("resnet18", _resnet_plan, "ResNet18_Weights", "torchvision ResNet-18"),
    _torchvision("resnet50", _resnet_plan, "ResNet50_Weights", "torchvision ResNet-50"),
    _torchvision("densenet121", _densenet_plan, "DenseNet121_Weights",
                 "torchvision DenseNet-121"),
    _cifar_resnet("resnet18", "MedMNIST's 28-px ResNet-18 (3x3 stride-1 stem, no max-pool; "
                  "the network of MedMNIST v2's 'ResNet-18 (28)' rows)"),
    _cifar_resnet("resnet50", "MedMNIST's 28-px ResNet-50 (3x3 stride-1 stem, no max-pool; "
                  "the network of MedMNIST v2's 'ResNet-50 (28)' rows)"),
)}


# -- timm ----------------------------------------------------------------------------------------
def import_timm() -> ModuleType:
    """timm (it imports torchvision, which needs the op schemas of :mod:`.tv_compat` first)."""
    import_torchvision()
    import timm

    return timm


def _resample_pos_embed(state: State, model: nn.Module) -> State:
    """A checkpoint's absolute position embeddings resampled (bicubic, timm's
    ``resample_abs_pos_embed``) to ``model``'s patch grid: a ViT pre-trained at another image
    size (the pre-training stage's ``size``) starts a target of this size; the class/register
    tokens' rows are kept as they are."""
    own = model.state_dict()
    pos = state.get("pos_embed")
    if pos is None or "pos_embed" not in own or pos.shape == own["pos_embed"].shape \
            or pos.ndim != 3 or not hasattr(model, "patch_embed"):
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens",
                                                                         1)
    grid = list(model.patch_embed.grid_size)
    return {**state, "pos_embed": resample_abs_pos_embed(pos, new_size=grid,
                                                         num_prefix_tokens=prefix)}


def _timm_card(name: str) -> ModelCard:
    timm = import_timm()
    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('.')[0][:8]}*")[:8]
        raise ValueError(
            f"unknown timm model {name!r}" + (f"; similar: {', '.join(near)}" if near else "")
            + " (all names: `python -c 'import timm; print(timm.list_models())'`)"
        )
    cfg = timm.get_pretrained_cfg(name)
    fixed = bool(cfg is not None and cfg.fixed_input_size)
    symmetric = cfg is not None and tuple(cfg.mean) == (0.5, 0.5, 0.5) \
        and tuple(cfg.std) == (0.5, 0.5, 0.5)

    def kwargs(in_channels: int, num_outputs: int, image_size: int | None) -> dict[str, Any]:
        # a model with a fixed input size (ViT: its position embeddings) is built for the
        # dataset's; convolutional ones take any size and no img_size argument
        size = {"img_size": image_size} if fixed and image_size else {}
        return {"in_chans": in_channels, "num_classes": num_outputs, **size}

    def build(in_channels: int, num_outputs: int, image_size: int | None) -> nn.Module:
        model = timm.create_model(name, pretrained=False,
                                  **kwargs(in_channels, num_outputs, image_size))
        return attach_plan(model, timm_plan(model))

    def imagenet(in_channels: int, image_size: int | None) -> State:
        try:  # timm adapts the stem to in_chans and resamples position embeddings to img_size
            model = timm.create_model(name, pretrained=True, **kwargs(in_channels, 1000,
                                                                      image_size))
        except Exception as exc:  # offline: OSError, LocalEntryNotFoundError, HTTP errors
            raise RuntimeError(
                f"could not download timm's pre-trained weights for {name} from the Hugging Face "
                f"hub ({type(exc).__name__}: {exc}). Offline? Pass a local checkpoint as "
                "`model.weights: /path/to.pt`, use `weights: pretrain`, or fill the Hugging "
                "Face cache (HF_HOME) on a machine with internet first."
            ) from exc
        return model.state_dict()

    return ModelCard(TIMM_PREFIX + name, f"timm {name}", build, imagenet,
                     "symmetric" if symmetric else "imagenet", _resample_pos_embed)


def known_archs() -> list[str]:
    """The zoo's names and the timm option, for error messages and `run-benchmark list`."""
    return [*MODELS, f"{TIMM_PREFIX}<name>"]


def get_card(arch: str) -> ModelCard:
    """The card of ``arch``; a ValueError names the known architectures."""
    if arch in MODELS:
        return MODELS[arch]
    if arch.startswith(TIMM_PREFIX) and arch[len(TIMM_PREFIX):]:
        return _timm_card(arch[len(TIMM_PREFIX):])
    raise ValueError(f"unknown model {arch!r}; choose one of {', '.join(known_archs())} "
                     "(any timm model, e.g. timm:convnext_atto)")


def build_model(arch: str, in_channels: int, num_outputs: int,
                image_size: int | None = None) -> nn.Module:
    """A randomly initialised ``arch`` taking ``in_channels`` and emitting ``num_outputs``, with
    its layer plan attached; ``image_size`` matters for models with a fixed input size (ViT)."""
    return get_card(arch).build(in_channels, num_outputs, image_size)


def input_normalisation(arch: str) -> str:
    """The normalisation ``arch``'s ImageNet weights expect (``imagenet`` or ``symmetric``)."""
    return get_card(arch).normalize
