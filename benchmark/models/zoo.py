"""The model zoo and pre-trained starting points.

Models: torchvision ResNet-18/50 and DenseNet-121 with the input channels and head adapted to
the task, ``smallcnn`` (a 4-block CNN) that keeps CPU tests fast, and any timm model as
``timm:<name>``. Each architecture is one :class:`ModelCard` in :data:`MODELS` (timm's are made
on demand by :func:`get_card`): how to build it, its ImageNet weights and the input
normalisation they expect. Every model the zoo builds carries its own
:class:`~metalr_bench.strategies.core.layers.LayerPlan` (layer groups input -> head, the head's
and the stem convolution's module paths), which the strategies' ``layer_groups`` reads: adding a
model is one card here, nothing in the strategies or the config.

Starting points (``weights``): ``none``, ``imagenet`` (torchvision's or timm's weights, downloaded
to the torch hub / Hugging Face cache), a local checkpoint path, or ``pretrain`` (the suite's own
supervised pre-training stage, see :mod:`metalr_bench.benchmark.training.pretrain`), so the
transfer setting works offline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from metalr_bench.benchmark.models.tv_compat import import_torchvision
from metalr_bench.strategies.core.layers import LayerPlan, attach_plan, plan_of
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


# -- layer plans (input -> head), one per family -------------------------------------------------
def _smallcnn_plan(model: nn.Module) -> LayerPlan:
    names = ("stem", "block1", "block2", "block3", "head")
    return LayerPlan(tuple((n, (n,)) for n in names), head="head", stem_conv="stem.0")


def _resnet_plan(model: nn.Module) -> LayerPlan:
    """stem (conv1, bn1), each residual block (layer1.0, layer1.1, ...), head (fc)."""
    plan: list[tuple[str, tuple[str, ...]]] = [("stem", ("conv1", "bn1"))]
    for i in range(1, 5):
        layer = model.get_submodule(f"layer{i}")
        plan += [(f"layer{i}.{j}", (f"layer{i}.{j}",)) for j in range(len(layer))]
    return LayerPlan(tuple(plan + [("head", ("fc",))]), head="fc", stem_conv="conv1")


def _densenet_plan(model: nn.Module) -> LayerPlan:
    """stem (conv0, norm0, pool0), each dense block and each transition, head (classifier); the
    final norm5 belongs to the last dense block."""
    names = [n for n, _ in model.get_submodule("features").named_children()]
    plan: list[tuple[str, list[str]]] = [
        ("stem", [f"features.{n}" for n in names if n in ("conv0", "norm0", "relu0", "pool0")])
    ]
    for n in names:
        if n.startswith(("denseblock", "transition")):
            plan.append((n, [f"features.{n}"]))
    plan[-1][1].append("features.norm5")
    plan.append(("head", ["classifier"]))
    return LayerPlan(tuple((n, tuple(m)) for n, m in plan), head="classifier",
                     stem_conv="features.conv0")


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


def timm_plan(model: nn.Module) -> LayerPlan:
    """The plan of a timm model from its own ``group_matcher(coarse=False)`` (the grouping timm's
    layer-wise LR decay uses, via ``timm.models.group_parameters``), input -> head.

    A group's paths are the largest modules whose parameters all belong to it, or a parameter
    itself (a ViT's ``cls_token``). Names: ``stem`` (the first group), ``head`` (the last: timm
    maps every parameter its matcher leaves out, the classifier and any neck, to the last
    group), and in between the path holding most of the group's weights (``layer1.0``,
    ``blocks.3``; ``blocks.11`` for a ViT's last block with the final norm, as ``denseblock4``
    holds DenseNet's ``norm5``; ``stages.1.blocks.0`` for a ConvNeXt block with its stage's
    downsampling), ``group<i>`` if taken.
    """
    from timm.models import group_parameters

    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        raise ValueError(f"timm model {type(model).__name__} has no group_matcher(), so it has "
                         "no layer grouping to share; choose another timm model")
    by_id = group_parameters(model, matcher(coarse=False))
    ordered = [list(by_id[k]) for k in sorted(by_id)]
    owner = {p: i for i, ps in enumerate(ordered) for p in ps}
    under: dict[str, set[int]] = {}  # module path -> groups of the parameters below it
    for p in owner:
        parts = p.split(".")[:-1]
        for k in range(1, len(parts) + 1):
            under.setdefault(".".join(parts[:k]), set()).add(owner[p])

    def cover(i: int, params: list[str]) -> tuple[str, ...]:
        paths: list[str] = []
        for p in params:
            parts = p.split(".")[:-1]
            best = next((".".join(parts[:k]) for k in range(1, len(parts) + 1)
                         if under[".".join(parts[:k])] == {i}), p)
            if best not in paths:
                paths.append(best)
        return tuple(paths)

    sizes = {n: p.numel() for n, p in model.named_parameters()}

    def main_path(paths: tuple[str, ...]) -> str:
        def weight(path: str) -> int:
            return sum(v for k, v in sizes.items() if k == path or k.startswith(path + "."))
        return max(paths, key=weight)

    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or "head"
    classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    first_conv = cfg.get("first_conv")
    first_conv = first_conv[0] if isinstance(first_conv, (tuple, list)) else first_conv
    try:
        stem_conv = first_conv if isinstance(model.get_submodule(first_conv), nn.Conv2d) else None
    except (AttributeError, TypeError):
        stem_conv = None

    groups: list[tuple[str, tuple[str, ...]]] = []
    for i, params in enumerate(ordered):
        paths = cover(i, params)
        name = "stem" if i == 0 else "head" if i == len(ordered) - 1 else main_path(paths)
        if name in {n for n, _ in groups} or (name in ("stem", "head") and 0 < i < len(ordered)
                                              - 1):
            name = f"group{i}"
        groups.append((name, paths))
    head_params = [p for p in owner if p.startswith(classifier + ".")]
    if not head_params or any(owner[p] != len(ordered) - 1 for p in head_params):
        raise ValueError(
            f"timm model {type(model).__name__}: its classifier {classifier!r} is not the last "
            "group of its group_matcher(), which every layer-wise strategy treats as the head; "
            "choose another timm model"
        )
    # the feature maps timm itself exposes (``feature_info``: ResNet's layer1..4, ConvNeXt's
    # stages, a ViT's blocks), kept where they hold weights between the stem and the head
    # (ResNet's ``act1`` is the stem's); a ViT's blocks give (N, tokens, C), NHWC models say so
    middle = set(range(1, len(ordered) - 1))
    features = tuple(f["module"] for f in getattr(model, "feature_info", None) or []
                     if under.get(f["module"]) and under[f["module"]] <= middle)
    tokens = hasattr(model, "num_prefix_tokens") or getattr(model, "output_fmt", "") == "NHWC"
    return LayerPlan(tuple(groups), head=classifier, stem_conv=stem_conv, features=features,
                     feature_axis=-1 if tokens else 1)


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


def _plan(model: nn.Module, arch: str) -> LayerPlan:
    plan = plan_of(model)
    if plan is None:
        raise ValueError(f"model {arch!r} carries no layer plan: build it with build_model")
    return plan


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Re-use RGB stem filters for ``in_channels`` inputs (timm's rule).

    Grey-scale sums the RGB filters (a grey image is R=G=B); more channels tile and rescale so
    the activation scale stays the same.
    """
    c = weight.shape[1]
    if in_channels == c:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // c)
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (c / in_channels)


class WeightsMismatch(ValueError):
    """A checkpoint that does not belong to the model's architecture."""


#: what ``model.weights_mapping`` accepts: keys matched by name, or paired in order
WEIGHTS_MAPPINGS = ("names", "positional")

#: keys a USCL checkpoint holds besides its backbone (``features.*``): the SimCLR projection MLP
#: (``l1``, ``l2``; ``linear`` in the released ResNetUSCL) and classifiers (``fc``, ``fc1``,
#: ``fc2``); the public MetaLR code drops every key starting with ``l``, ``fc`` or ``classifier``
#: before pairing the rest by position (``l`` alone would drop torchvision's ``layer1...`` too)
USCL_HEAD_PREFIXES = ("l1.", "l2.", "linear.", "fc", "classifier")


def map_by_position(model: nn.Module, arch: str, state: Mapping[str, torch.Tensor], source: str,
                    *, drop_prefixes: tuple[str, ...] | list[str] = USCL_HEAD_PREFIXES,
                    ) -> dict[str, torch.Tensor]:
    """Rename a foreign checkpoint's tensors to ``model``'s backbone keys, pairing them in order.

    Why: a checkpoint saved from another wrapper of the same network (USCL's ``features.0``,
    ``features.4.0.conv1`` for torchvision's ``conv1``, ``layer1.0.conv1``) has other names but
    the same tensors in the same order, which is how the public MetaLR code loads its USCL start.
    Keys starting with one of ``drop_prefixes`` (the projection head, a classifier) are dropped;
    the rest pair with the model's state dict entries outside its head, in order. Every pair's
    shape must match (the stem's input channels excepted: :func:`load_state` adapts them), and
    the counts too; otherwise a :class:`WeightsMismatch` names the first mismatch. A checkpoint
    without BatchNorm's ``num_batches_tracked`` counters (older PyTorch) pairs without them
    (the model keeps its own).
    """
    plan = _plan(model, arch)
    head = plan.head + "."
    stem_key = f"{plan.stem_conv}.weight"
    prefixes = tuple(drop_prefixes)
    theirs = [(k, v) for k, v in state.items() if not (prefixes and k.startswith(prefixes))]
    ours = [(k, v) for k, v in model.state_dict().items() if not k.startswith(head)]
    counters: dict[str, torch.Tensor] = {}
    if not any(k.endswith("num_batches_tracked") for k, _ in theirs):
        counters = {k: v for k, v in ours if k.endswith("num_batches_tracked")}
        ours = [(k, v) for k, v in ours if k not in counters]
    dropped = f"after dropping keys starting with {', '.join(prefixes) or '(nothing)'}"
    for i, ((tk, tv), (ok, ov)) in enumerate(zip(theirs, ours, strict=False)):
        same = tuple(tv.shape) == tuple(ov.shape) or (
            ok == stem_key and tv.ndim == ov.ndim == 4
            and tv.shape[:1] + tv.shape[2:] == ov.shape[:1] + ov.shape[2:]
        )
        if not same:
            raise WeightsMismatch(
                f"checkpoint {source} does not pair with model {arch!r} by position ({dropped}): "
                f"position {i}: checkpoint {tk!r} {tuple(tv.shape)} vs model {ok!r} "
                f"{tuple(ov.shape)}. Check `model.arch`, and `model.drop_prefixes` for head keys "
                "left in the checkpoint."
            )
    if len(theirs) != len(ours):
        extra = (f"first unpaired checkpoint key: {theirs[len(ours)][0]!r}"
                 if len(theirs) > len(ours) else
                 f"first unpaired model key: {ours[len(theirs)][0]!r}")
        raise WeightsMismatch(
            f"checkpoint {source} does not pair with model {arch!r} by position: it holds "
            f"{len(theirs)} tensors {dropped}, the model's backbone {len(ours)} ({extra}). Check "
            "`model.arch`, and `model.drop_prefixes` for head keys left in the checkpoint."
        )
    return {ok: tv for (_, tv), (ok, _) in zip(theirs, ours, strict=True)} | counters


def load_state(model: nn.Module, arch: str, state: Mapping[str, torch.Tensor], source: str,
               *, keep_head: bool = False, mapping: str = "names",
               drop_prefixes: tuple[str, ...] | list[str] | None = None) -> None:
    """Load a backbone ``state`` into ``model``; the head stays freshly initialised.

    ``mapping="positional"`` first renames a foreign checkpoint's keys by position
    (:func:`map_by_position`, dropping ``drop_prefixes``, default :data:`USCL_HEAD_PREFIXES`);
    its head is never loaded.

    Why always new: a source head whose shape happens to match the target's (a 2-class source
    and a 2-class target, a 4-class source and OctMNIST) was trained for *other* classes; reusing
    it would make "linear probe" and L2-SP's head term start from a head for the wrong task, and
    only for some datasets. The public MetaLR code and Transfer-Learning-Library re-initialise
    the head too. ``keep_head=True`` (``model.keep_head`` in the config) keeps a matching head,
    for a checkpoint trained on the same classes.

    Raises a ValueError naming the checkpoint, the mismatching keys and the fix when the
    checkpoint does not belong to ``arch``.
    """
    if mapping not in WEIGHTS_MAPPINGS:
        raise ValueError(f"mapping={mapping!r}: expected one of {', '.join(WEIGHTS_MAPPINGS)}")
    if mapping == "positional":
        state = map_by_position(
            model, arch, state, source,
            drop_prefixes=USCL_HEAD_PREFIXES if drop_prefixes is None else drop_prefixes,
        )
    plan = _plan(model, arch)
    own = model.state_dict()
    state = dict(state)
    adapt = get_card(arch).adapt_state
    if adapt is not None:
        state = adapt(state, model)
    stem_key = f"{plan.stem_conv}.weight"
    if plan.stem_conv and stem_key in state and state[stem_key].shape[1] != own[stem_key].shape[1]:
        state[stem_key] = adapt_input_conv(state[stem_key], own[stem_key].shape[1])
    head = plan.head + "."
    state = {
        k: v for k, v in state.items()
        if not (k.startswith(head) and k in own and (not keep_head or own[k].shape != v.shape))
    }
    missing = [k for k in own if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or bad_shape:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        problems = []
        if missing:
            problems.append(f"missing keys: {show(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {show(unexpected)}")
        if bad_shape:
            problems.append(f"shape mismatch: {show(bad_shape)}")
        raise WeightsMismatch(
            f"checkpoint {source} does not match model {arch!r} ({'; '.join(problems)}). "
            f"Use a checkpoint saved from {arch!r}, or change `model.arch` to the checkpoint's "
            "architecture."
        )
    model.load_state_dict(state, strict=False)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` (a bare state dict or ``{"model": state_dict}``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint {p} does not exist: pass an existing .pt file to `model.weights`, "
            "or use `weights: pretrain` to pre-train on a source dataset first"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a torch file
        # PyTorch's weights_only error runs to six lines of advice ("Please file an issue",
        # "weights_only=False ... arbitrary code execution") that fit a pickle of classes, not a
        # text file: keep its last specific line (e.g. "Unsupported operand 103") only
        reason = next((ln.strip() for ln in reversed(str(exc).splitlines()) if ln.strip()
                       and "weights_only" not in ln and "Please file" not in ln
                       and not ln.strip().endswith("error:")), type(exc).__name__)
        raise ValueError(f"checkpoint {p} could not be read as a PyTorch file ({reason}); pass "
                         "a state dict saved with torch.save(model.state_dict(), path)") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {p} holds {type(obj).__name__}, expected a state dict")
    return obj


def imagenet_state(arch: str, in_channels: int = 3,
                   image_size: int | None = None) -> dict[str, torch.Tensor]:
    """``arch``'s ImageNet weights (torchvision's or timm's; needs the internet or a warm cache).

    ``in_channels``/``image_size``: timm adapts its stem and position embeddings to them;
    torchvision's state stays RGB (:func:`load_state` adapts the stem).
    """
    card = get_card(arch)
    if card.imagenet is None:
        have = [n for n, c in MODELS.items() if c.imagenet is not None]
        raise ValueError(f"no ImageNet weights for {arch!r}; available for {', '.join(have)} "
                         f"and {TIMM_PREFIX}<name>")
    return card.imagenet(in_channels, image_size)
