"""The one layer grouping of a model, read from the model's own record.

Why one grouping: last-k, layer-wise LR decay, MetaLR, DELTA's stages and the per-layer drift
in the report all speak of "layers"; they must mean the same thing. Why the model owns it: like
timm, whose models carry ``group_matcher()`` and ``pretrained_cfg`` (classifier, first conv),
the code that builds an architecture knows its blocks; guessing them here from class names
repeated every model in three places (the zoo, this module, the config). The zoo
(``metalr_bench.benchmark.models``) attaches a :class:`LayerPlan` to every model it builds
(:func:`attach_plan`); this module only reads it, so strategies never import the benchmark and
adding a model is one entry in the zoo.

Groups are ordered from the input (stem) to the output (head). A model without a plan (one
built outside the zoo, in a test) falls back to one group per top-level child that owns
parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: the attribute of a model that holds its :class:`LayerPlan`
PLAN_ATTR = "layer_plan"


@dataclass(frozen=True)
class LayerGroup:
    name: str
    modules: tuple[str, ...]  # module paths owned by this group
    params: tuple[str, ...]  # parameter names (model.named_parameters()) owned by this group


@dataclass(frozen=True)
class LayerPlan:
    """A model's record of its own structure, filled by the code that builds it.

    ``groups``: (name, paths) from input to head; a path is a module (it owns every parameter
    below it) or a parameter of the model itself (a ViT's ``cls_token``). The last group is the
    head. ``head``: the module path of the task's classifier (a new one per task: checkpoints
    never load into it). ``stem_conv``: the module path of the first convolution, whose input
    channels a checkpoint's filters are adapted to (``None``: none to adapt). ``features``: the
    module paths whose outputs are the model's intermediate feature maps, input to head (timm's
    ``feature_info``; DELTA's feature maps); empty: one per stage of the groups (what the
    groups' names say, :func:`stages`). ``feature_axis``: their channel axis (1: (N, C, H, W);
    -1: a ViT's (N, tokens, C) or NHWC).
    """

    groups: tuple[tuple[str, tuple[str, ...]], ...]
    head: str
    stem_conv: str | None = None
    features: tuple[str, ...] = ()
    feature_axis: int = 1


def attach_plan(model: nn.Module, plan: LayerPlan) -> nn.Module:
    """Attach ``plan`` to ``model`` (a plain attribute: it follows ``.to()`` and deepcopy)."""
    setattr(model, PLAN_ATTR, plan)
    return model


def plan_of(model: nn.Module) -> LayerPlan | None:
    """The plan the model's builder attached, or None."""
    plan = getattr(model, PLAN_ATTR, None)
    return plan if isinstance(plan, LayerPlan) else None


def _children_plan(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    return [
        (n, (n,)) for n, m in model.named_children() if any(True for _ in m.parameters())
    ]


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Ordered groups (input -> output); every parameter belongs to exactly one group."""
    plan = plan_of(model)
    entries = list(plan.groups) if plan is not None else _children_plan(model)

    all_params = [n for n, _ in model.named_parameters()]
    groups, owned = [], set()
    for name, paths in entries:
        prefixes = tuple(m + "." for m in paths)
        exact = set(paths)
        params = tuple(p for p in all_params if p in exact or p.startswith(prefixes))
        groups.append(LayerGroup(name, tuple(paths), params))
        owned.update(params)
    orphans = [p for p in all_params if p not in owned]
    if orphans or len(owned) != sum(len(g.params) for g in groups):
        raise RuntimeError(f"layer grouping of {type(model).__name__} missed {orphans[:5]}")
    return groups


def modules_of(model: nn.Module, group: LayerGroup) -> list[nn.Module]:
    """The modules ``group`` owns that exist in ``model`` (a ReLU in a plan may have none; a
    parameter path such as a ViT's ``cls_token`` is no module)."""
    out = []
    for path in group.modules:
        try:
            out.append(model.get_submodule(path))
        except AttributeError:
            continue
    return out


def stages(groups: list[LayerGroup]) -> list[tuple[str, str]]:
    """(stage name, module path of its output) for every stage between the stem and the head,
    from the group names: consecutive groups whose names share the part before the first dot
    form one stage (``layer1.0``, ``layer1.1``), whose output is its last group's last module.
    For the zoo's models (ResNet, DenseNet, the small CNN), whose plans name no ``features``."""
    out: list[tuple[str, str]] = []
    for g in groups[1:-1]:
        stage = g.name.split(".")[0]
        if out and out[-1][0] == stage:
            out[-1] = (stage, g.modules[-1])
        else:
            out.append((stage, g.modules[-1]))
    return out


def feature_maps(model: nn.Module, groups: list[LayerGroup]) -> tuple[list[tuple[str, str]], int]:
    """The model's intermediate feature maps as (name, module path), input to head, and their
    channel axis: the plan's ``features`` where the model names them (timm), else
    :func:`stages` of the groups with channels on axis 1."""
    plan = plan_of(model)
    if plan is not None and plan.features:
        return [(path, path) for path in plan.features], plan.feature_axis
    return stages(groups), 1
