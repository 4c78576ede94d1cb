"""One function that splits a model into ordered layer groups.

Why one function: last-k, layer-wise LR decay, MetaLR and the per-layer drift in the report
all speak of "layers"; they must mean the same thing. Like timm's ``optim/_param_groups.py``,
groups are ordered from the input (stem) to the output (head):

* ResNet: stem (conv1, bn1), each residual block (layer1.0, layer1.1, ...), head (fc);
* DenseNet: stem (conv0, norm0, pool0), each dense block and each transition, head
  (classifier); the final norm5 belongs to the last dense block;
* SmallCNN: stem, block1..3, head;
* any other model: each top-level child that owns parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerGroup:
    name: str
    modules: tuple[str, ...]  # module paths owned by this group
    params: tuple[str, ...]  # parameter names (model.named_parameters()) owned by this group


def _resnet_plan(model: nn.Module) -> list[tuple[str, list[str]]]:
    plan = [("stem", ["conv1", "bn1"])]
    for i in range(1, 5):
        layer = getattr(model, f"layer{i}")
        plan += [(f"layer{i}.{j}", [f"layer{i}.{j}"]) for j in range(len(layer))]
    return plan + [("head", ["fc"])]


def _densenet_plan(model: nn.Module) -> list[tuple[str, list[str]]]:
    names = [n for n, _ in model.features.named_children()]
    plan: list[tuple[str, list[str]]] = [
        ("stem", [f"features.{n}" for n in names if n in ("conv0", "norm0", "relu0", "pool0")])
    ]
    for n in names:
        if n.startswith(("denseblock", "transition")):
            plan.append((n, [f"features.{n}"]))
    plan[-1][1].append("features.norm5")
    return plan + [("head", ["classifier"])]


def _children_plan(model: nn.Module) -> list[tuple[str, list[str]]]:
    return [
        (n, [n]) for n, m in model.named_children() if any(True for _ in m.parameters())
    ]


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Ordered groups (input -> output); every parameter belongs to exactly one group."""
    cls = type(model).__name__.lower()
    if cls.startswith("resnet"):
        plan = _resnet_plan(model)
    elif cls.startswith("densenet"):
        plan = _densenet_plan(model)
    else:
        plan = _children_plan(model)

    all_params = [n for n, _ in model.named_parameters()]
    groups, owned = [], set()
    for name, modules in plan:
        prefixes = tuple(m + "." for m in modules)
        params = tuple(p for p in all_params if p.startswith(prefixes))
        groups.append(LayerGroup(name, tuple(modules), params))
        owned.update(params)
    orphans = [p for p in all_params if p not in owned]
    if orphans or len(owned) != sum(len(g.params) for g in groups):
        raise RuntimeError(f"layer grouping of {type(model).__name__} missed {orphans[:5]}")
    return groups


def modules_of(model: nn.Module, group: LayerGroup) -> list[nn.Module]:
    """The modules ``group`` owns that exist in ``model`` (a ReLU in a plan may have none)."""
    out = []
    for path in group.modules:
        try:
            out.append(model.get_submodule(path))
        except AttributeError:
            continue
    return out
