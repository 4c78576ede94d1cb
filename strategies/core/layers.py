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
    channels a checkpoint's filters are adapted to (``None``: none to adapt).
    """

    groups: tuple[tuple[str, tuple[str, ...]], ...]
    head: str
    stem_conv: str | None = None


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
