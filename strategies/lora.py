"""LoRA (Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang & Chen, ICLR 2022, "LoRA: Low-Rank
Adaptation of Large Language Models"), on the backbone's convolutions and linear layers: freeze
every pre-trained weight W and learn a low-rank update of it,

    W' = W + (α/r) · B·A,     A ∈ R^{r×k}, B ∈ R^{d×r}, B = 0 at the start,

so the model computes the pre-trained function at the start. The new head trains in full. Built
with Hugging Face ``peft`` (``pip install -e ".[lora]"``): every ``Conv2d`` (``groups == 1``) and
``Linear`` outside the head is adapted; every other backbone parameter is frozen, BatchNorm stays
in train mode. At the end of training the adapters are merged into W, so the run tests (and the
drift and transferability see) the base architecture with its own parameter names.

Defaults: r = 8, α = r, no LoRA dropout (peft's defaults). Tuned: lr, r and α (log-uniform
1..64). Logged per epoch: ``trainable_params``, ``trainable_share``.

Deviation: every convolution is adapted (the paper adapts a Transformer's attention projections;
LoRA-C's analogue on a CNN). Conv layers, names while training, resume: docs/strategies.md,
section ``lora``.
"""

from __future__ import annotations

from typing import Any

import torch
from metalr_bench.strategies.core.base import EndContext, Strategy, register, trainable_values
from metalr_bench.strategies.core.space import LR, SearchDim
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

#: the pip extra that installs peft, named in the error when it is missing
EXTRA = 'pip install -e ".[lora]"  (or: pip install "peft>=0.21,<0.22")'
#: the layer types LoRA adapts
TARGET_TYPES = (nn.Conv2d, nn.Linear)


class LoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="rank of the update B·A")
    alpha: float | None = Field(None, gt=0, description="α: the update is scaled by α/r; "
                                "default α = r (scale 1, the paper's choice)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input "
                           "(peft's lora_dropout)")


def _peft() -> Any:
    """peft, or an error that says how to install it."""
    try:
        import peft
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "peft" or "peft" in str(exc):
            raise ImportError(f"strategy lora needs the optional package peft, which is not "
                              f"installed ({exc}); install the `lora` extra: {EXTRA}") from exc
        raise ImportError(f"strategy lora: peft is installed but does not import ({exc}); a "
                          "torchvision whose compiled ops do not match torch breaks its "
                          "transformers import: build the cell through the benchmark's cell "
                          "builder (it imports torchvision through its compatibility shim "
                          "first), or install the matching torchvision") from exc
    return peft


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> peft LoRA layer, for every adapted layer of ``model``."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def merge_and_unload(model: nn.Module, *, skip_zero: bool = False) -> None:
    """Merge every adapter into its base layer (W ← W + (α/r)·B·A) and put the base layer back
    at its path: the model is the base architecture again, with its own parameter names.
    ``skip_zero``: an adapter whose B is still 0 adds nothing; skip its merge (one host read
    per layer, so not on the training path)."""
    for path, layer in _lora_layers(model).items():
        if not (skip_zero and not any(b.weight.any() for b in layer.lora_B.values())):
            layer.merge()
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):  # set by inject_adapter_in_model
        del model.peft_config


def targets(model: nn.Module, head_modules: tuple[str, ...]) -> list[str]:
    """Paths of the layers LoRA adapts: every Conv2d with groups == 1 and every Linear that is
    not in the head."""
    head = tuple(m + "." for m in head_modules)
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, TARGET_TYPES) or name in head_modules or name.startswith(head):
            continue
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            continue
        out.append(name)
    return out


@register
class LoRA(Strategy):
    """LoRA (Hu et al., ICLR 2022): W + (α/r)·B·A on the backbone's convolutions and linear
    layers (peft), the head in full; merged for evaluation; needs the `lora` extra."""

    name = "lora"
    description = ("LoRA (Hu et al., ICLR 2022): W + (α/r)·B·A on the backbone's convs and linear "
                   "layers (peft; extra `lora`), head in full, merged for evaluation")
    Params = LoRAParams
    test_params = [{"r": 2}, {"r": 4, "alpha": 8.0, "dropout": 0.1}]
    search_space = {"lr": LR, "r": SearchDim("int", 1, 64, log=True),
                    "alpha": SearchDim("float", 1.0, 64.0, log=True)}
    mechanism = "trainable_share"

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        peft = _peft()
        p: LoRAParams = self.params
        self.alpha = float(p.r if p.alpha is None else p.alpha)
        # a model adapted by an earlier lora strategy (tests build several on one model):
        # back to its base layers first, keeping what it computes
        merge_and_unload(model, skip_zero=True)
        head = groups[-1].modules
        self.targets = targets(model, head)
        if not self.targets:
            raise ValueError(f"strategy lora: the model {type(model).__name__} has no "
                             "convolution or linear layer outside the head to adapt")
        config = peft.LoraConfig(r=p.r, lora_alpha=self.alpha, lora_dropout=p.dropout,
                                 target_modules=self.targets, bias="none")
        peft.inject_adapter_in_model(config, model)  # freezes every non-adapter parameter
        for name, param in model.named_parameters():
            if name.startswith(tuple(m + "." for m in head)):
                param.requires_grad_(True)  # the new head trains in full

    def param_groups(self) -> list[dict[str, Any]]:
        """Per layer group: its adapters (and the head's parameters), at the base LR. Groups
        are matched by module path, which peft keeps."""
        named = list(self.model.named_parameters())
        out = []
        for g in self.groups:
            prefixes = tuple(m + "." for m in g.modules)
            params = [p for n, p in named if n.startswith(prefixes) and p.requires_grad]
            out.append({"params": params, "name": g.name, "lr": self.settings.lr})
        return out  # groups without an adapter are dropped by build_optimizer

    def start_state(self) -> dict[str, torch.Tensor]:
        """The starting weights in the base architecture's names (B = 0: W + (α/r)·B·A = W):
        ``<layer>.base_layer.*`` renamed ``<layer>.*``, the adapters left out."""
        layers = list(_lora_layers(self.model))
        out = {}
        for key, value in self.model.state_dict().items():
            owner = next((p for p in layers if key.startswith(p + ".")), None)
            if owner is not None:
                rest = key[len(owner) + 1:]
                if not rest.startswith("base_layer."):
                    continue  # lora_A / lora_B / dropout: not part of the base architecture
                key = f"{owner}.{rest.removeprefix('base_layer.')}"
            out[key] = value.detach().clone()
        return out

    @torch.no_grad()
    def on_train_end(self, ctx: EndContext) -> None:
        """Merge the adapters into the selected checkpoint's base weights (the same function,
        so nothing to re-measure)."""
        merge_and_unload(ctx.model)
        return None

    def log_values(self) -> dict[str, float]:
        return super().log_values() | trainable_values(self.model)
