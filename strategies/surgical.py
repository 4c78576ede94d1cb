"""Surgical fine-tuning (Lee, Chen, Tajwar, Kumar, Yao, Liang & Finn, ICLR 2023, "Surgical
Fine-Tuning Improves Adaptation to Distribution Shifts"): fine-tune only a chosen block of
layers and freeze the rest.

The paper finds that which block is best depends on the shift: early layers for input-level
shifts (corruptions), middle layers for feature-level shifts, the last layer for label-level
shifts. So the block is a hyper-parameter, chosen on validation data. Here it is ``blocks``,
and ``--tune`` searches it.

``blocks`` names layer groups (:mod:`metalr_bench.strategies.core.layers`: ResNet: stem, each
residual block, head). It is a position, a name, or a list of them:

* a position counts layer groups from the input, starting at 1: 1 is the stem, 2 the first
  block after it (ResNet ``layer1.0``, SmallCNN ``block1``, the default), and the number of
  groups is the head. It counts from 1 like last-k's ``k`` (which counts from the head), so the
  searched range is ``1 .. groups`` and every point of it is a valid group;
* a name selects the group of that name, or every group under it: ``layer1`` is ``layer1.0``
  and ``layer1.1``;
* a list selects several groups. In a config a list of values expands into a grid, so several
  groups in *one* cell are a nested list: ``blocks: [[stem, layer1]]``.

Frozen groups get ``requires_grad=False`` and their modules stay in eval mode, as in last-k:
their BatchNorm running statistics, like their weights, stay the pre-trained ones, and the
trainer's PreciseBN leaves them alone. The chosen groups and the head train at the base LR.
Logged every epoch: ``trainable_params`` (parameter elements trained) and ``trainable_share``
(their share of all parameters), the strategy's ``mechanism``.

Deviations from the paper and its code (``yoonholee/Surgical-finetuning``), and why:

* The head always trains. The paper tunes the chosen block alone and keeps the source model's
  head, because its source and target tasks share their labels (CIFAR-10 to CIFAR-10-C). The
  suite gives every strategy a new, randomly initialised head for the target's classes, and a
  frozen random head would leave nothing to learn from. So ``blocks`` is "the block(s) tuned
  besides the new head". Choosing the head itself (the last position) is head-only training,
  the paper's "last layer" option (``last_k`` with k=1).
* The unit is the suite's layer group, which is finer than the paper's block. A paper block on
  a ResNet is a stage (conv1 + ``layer1`` is its "first block", ``layer2`` its second, ...); a
  layer group is one residual block. The same groups as the paper's are reachable by name,
  e.g. ``blocks: [[stem, layer1]]`` or ``blocks: layer2``. Residual blocks share the unit of
  last_k, layer_decay and MetaLR and of the report's per-layer drift.
* Frozen layers keep their BatchNorm statistics. The reference puts the whole network in train
  mode, so the running statistics of the frozen layers adapt to the target data while their
  weights stay fixed. Here "frozen" means the whole layer, weights and statistics, as in
  last_k, so the two strategies' "frozen" mean the same.
* The untuned default, ``blocks: 2`` (the first block after the stem, ResNet ``layer1.0``), is
  the paper's choice for input-level shifts (its "first block"), the kind a change of scanner
  or dataset is closest to; it was not chosen on our data. The paper picks the block on
  validation data, so ``--tune`` searches it over every layer group (1 .. groups, the same
  trial budget as every strategy), and a tuned leaderboard is the one to read.
* Optimizer and LR are the suite's shared settings (``--tune`` searches ``lr`` and ``blocks``).
  The reference runs Adam on a small (lr, weight decay) grid per block.
"""

from __future__ import annotations

from typing import Any

from metalr_bench.strategies.core.base import Strategy, register, trainable_values
from metalr_bench.strategies.core.layers import LayerGroup
from metalr_bench.strategies.core.space import LR, SearchDim
from pydantic import BaseModel, ConfigDict, Field, field_validator


class SurgicalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    blocks: int | str | list[int | str] = Field(
        2, description="layer groups to fine-tune besides the head: positions counted from the "
        "input (1 = stem, 2 = the first block after it), names (a name also selects the groups "
        "under it: layer1 = layer1.0 and layer1.1), or a list of them",
    )

    @field_validator("blocks")
    @classmethod
    def _valid(cls, value: int | str | list[int | str]) -> int | str | list[int | str]:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ValueError("name at least one layer group")
        for item in items:
            if isinstance(item, int) and item < 1:
                raise ValueError(f"position {item}: positions count layer groups from the "
                                 "input starting at 1 (1 = stem)")
            if isinstance(item, str) and not item:
                raise ValueError("an empty group name")
        return value


def chosen_groups(spec: int | str | list[int | str], groups: list[LayerGroup]) -> list[int]:
    """0-based indices of the layer groups ``spec`` names (positions count from 1)."""
    n = len(groups)
    known = ", ".join(f"{i + 1}={g.name}" for i, g in enumerate(groups))
    chosen: set[int] = set()
    for item in spec if isinstance(spec, list) else [spec]:
        if isinstance(item, int):
            if not 1 <= item <= n:
                raise ValueError(f"strategy surgical: block position {item} is not one of the "
                                 f"model's {n} layer groups ({known})")
            chosen.add(item - 1)
            continue
        hits = {i for i, g in enumerate(groups)
                if g.name == item or g.name.startswith(item + ".")}
        if not hits:
            raise ValueError(f"strategy surgical: no layer group is named {item!r} or lies "
                             f"under it; the model's groups: {known}")
        chosen |= hits
    return sorted(chosen)


@register
class Surgical(Strategy):
    """Surgical fine-tuning: train only the chosen layer group(s) and the new head."""

    name = "surgical"
    Params = SurgicalParams
    test_params = [{"blocks": 2}, {"blocks": ["stem", 4]}]
    #: which group (with the head); high="groups" resolves to the number of groups, the head
    search_space = {"lr": LR, "blocks": SearchDim("int", 1, "groups")}
    mechanism = "trainable_share"

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        self.trained = sorted(set(chosen_groups(self.params.blocks, groups)) | {len(groups) - 1})
        # frozen groups keep the source's weights *and* BatchNorm statistics: `freeze` turns off
        # their gradients and `set_train_mode` keeps their modules in eval mode every epoch, so
        # neither the training forwards nor the trainer's PreciseBN (which re-estimates only
        # BatchNorm layers in train mode) touch their running statistics (tested)
        self.freeze([g for i, g in enumerate(groups) if i not in self.trained])
        #: the parameters this strategy fine-tunes (chosen groups and head)
        self.trained_params = [p for p in model.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        return [self._group(i, lr=self.settings.lr) for i in self.trained]

    def log_values(self) -> dict[str, float]:
        """The group LRs, ``trainable_params`` and ``trainable_share`` (the ``mechanism``)."""
        return super().log_values() | trainable_values(self.model)
