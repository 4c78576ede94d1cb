"""Surgical fine-tuning (Lee, Chen, Tajwar, Kumar, Yao, Liang & Finn, ICLR 2023, "Surgical
Fine-Tuning Improves Adaptation to Distribution Shifts"): fine-tune only a chosen block of
layers and freeze the rest.

Which block is best depends on the shift, so the block is a hyper-parameter, ``blocks``, chosen
on validation data (``--tune`` searches it). ``blocks`` names layer groups
(:mod:`metalr_bench.strategies.core.layers`): a position from the input starting at 1 (1 = the
stem, the number of groups = the head), a group name or prefix (``layer1``), or a nested list for
several groups in one cell (``blocks: [[stem, layer1]]``).

Frozen groups get ``requires_grad=False`` and stay in eval mode (weights and BatchNorm
statistics kept, as in last-k); the chosen groups and the new head train at the base LR.

Defaults: ``blocks: 2`` (the first block after the stem, the paper's choice for input-level
shifts; not chosen on our data); tuned over 1 .. groups with ``lr``. Logged per epoch:
``trainable_params``, ``trainable_share`` (the ``mechanism``).

Deviations (the head always trains, the unit is a layer group, frozen layers keep their
BatchNorm statistics, the suite's optimizer): docs/strategies.md, section ``surgical``.
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
