"""Layer plans: each model family's layer groups, input -> head.

A plan names the groups (``stem``, each residual/dense block, ``head``) with their module paths,
the head's path and the stem convolution's; the strategies' ``layer_groups`` reads it
(:mod:`metalr_bench.strategies.core.layers` defines the type, since strategies must not import
the benchmark). The builders (:mod:`.builders`) attach one to every model they make; this module
imports neither them nor the weights, so both may import it.
"""

from __future__ import annotations

from metalr_bench.strategies.core.layers import LayerPlan, plan_of
from torch import nn


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


def _plan(model: nn.Module, arch: str) -> LayerPlan:
    plan = plan_of(model)
    if plan is None:
        raise ValueError(f"model {arch!r} carries no layer plan: build it with build_model")
    return plan
