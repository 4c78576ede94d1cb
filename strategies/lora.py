"""LoRA (Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang & Chen, ICLR 2022, "LoRA: Low-Rank
Adaptation of Large Language Models"), on the backbone's convolutions and linear layers: freeze
every pre-trained weight W and learn a low-rank update of it,

    W' = W + (α/r) · B·A,     A ∈ R^{r×k}, B ∈ R^{d×r}, B = 0 at the start,

so the model computes the pre-trained function at the start and trains r·(d + k) numbers per
layer instead of d·k. The new head trains in full. Built with Hugging Face ``peft``
(``inject_adapter_in_model`` with a ``LoraConfig``; install the extra: ``pip install -e
".[lora]"``), so the layers are peft's own:

* ``nn.Linear`` (d × k): A is a Linear k → r, B a Linear r → d;
* ``nn.Conv2d`` (out × in × kh × kw), as in peft's ``Conv2d`` LoRA and LoRA-C (Ding et al.
  2024): A is a convolution in → r with the layer's kernel, stride and padding, B a 1×1
  convolution r → out, so ΔW = (α/r) · B·A with A flattened to r × (in·kh·kw): the forward
  ``x ↦ conv_W(x) + (α/r)·conv_B(conv_A(x))`` equals ``conv_{W+ΔW}(x)``.

Targets: every ``Conv2d`` (with ``groups == 1``) and ``Linear`` outside the head, the head (the
last layer group) excluded because it trains in full. Depthwise and grouped convolutions are not
adapted (peft cannot merge them); they stay frozen. Every other parameter of the backbone
(BatchNorm's scale and shift included) is frozen (``requires_grad=False``); BatchNorm layers stay
in train mode, so their running statistics follow the target data (peft's behaviour). A starts
as peft initialises it (Kaiming-uniform, the paper: Gaussian), B at zero.

Merged for evaluation: at the end of training (``on_train_end``: after the best checkpoint is
loaded, before the test split is read) every adapter is merged, W ← W + (α/r)·B·A, and the peft
layer replaced by its base layer again. So the model the run tests, the drift and the
transferability metrics see, and the runner keeps is the base architecture with its own
parameter names; while training, the wrapped layers are named ``<layer>.base_layer.weight``,
``<layer>.lora_A.default.weight`` and ``<layer>.lora_B.default.weight`` (checkpoints for
resume are saved in these names and rebuilt the same way). The layer groups keep their module
paths (peft wraps a layer at its own path), so each layer group's adapters form its optimizer
group and LR (``lr/<group>``). :meth:`LoRA.start_state` gives the starting weights in the base
names (B = 0: exactly the pre-trained W).

Logged each epoch: ``trainable_params`` and ``trainable_share`` (trained / all parameters of the
model being trained, adapters included, as peft's ``print_trainable_parameters`` counts).

Defaults: r = 8 (peft's default; the paper uses 1..64, mostly 4-8), α = r (the paper sets α to
the first r it tries and does not tune it: scale 1), no LoRA dropout (peft's default). Tuned:
the base LR, r (integer, log-uniform 1..64) and α (log-uniform 1..64).

Deviations, and why: the paper adapts only the attention projections of a Transformer; on a CNN
every convolution is the analogue (LoRA-C, Conv-LoRA). The head is a new layer here (no
pre-trained weight to adapt), so it trains in full, as the paper's task heads do.
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
