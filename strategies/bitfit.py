"""BitFit (Ben Zaken, Ravfogel & Goldberg, ACL 2022, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models"): train only the bias terms, and the
new task head, of the pre-trained network.

    trained = {b : every bias of the backbone} ∪ head

For a CNN the bias terms are the convolution/linear biases and the affine shift β of the
normalisation layers (BatchNorm, GroupNorm, LayerNorm: their parameter named ``bias``), as the
paper trains LayerNorm's bias and not its gain. A torchvision ResNet's convolutions have no bias,
so there BitFit trains the BatchNorm β and the head: 4,800 + 1,026 = 5,826 parameters on
ResNet-18 with a 2-class head. Every other parameter gets ``requires_grad=False``: it gets no
gradient, so no optimizer (weight decay included) moves it and no optimizer state is kept for it.

``train_norm_scale: true`` also trains the normalisation layers' scales γ (ResNet-18: 10,626
parameters), the variant some CNN studies call BitFit. It is not the paper's method, and a
strong one of its own (re-scaling every channel), so it is a parameter that shows in the row's
label (``bitfit(train_norm_scale=True)``, also when tuned), never plain ``bitfit``.

BatchNorm layers stay in train mode, so their running statistics adapt to the target data like
their shifts; the trainer's PreciseBN re-estimates them before each evaluation, as for
every strategy. The reference freezes nothing else (there is no dropout to speak of here).

Logged each epoch: ``trainable_params`` (the count) and ``trainable_share`` (trained parameters /
all parameters), the figure that shows the mechanism acted, next to each group's LR.

Deviations, and why: the paper trains the biases of a BERT (linear and LayerNorm layers); in a
CNN we count the convolution/linear biases and BatchNorm's β, as the paper counts LayerNorm's
bias and not its gain. The
paper tunes the LR over {1e-4, 4e-4, 7e-4, 1e-3} with AdamW; here the base LR is tuned like
every strategy's (the same range and budget), with the suite's optimizer.
"""

from __future__ import annotations

from typing import Any, ClassVar

from metalr_bench.strategies.core.base import Strategy, register, trainable_values
from metalr_bench.strategies.core.space import LR
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

#: normalisation layers whose affine scale and shift BitFit trains (timm's LayerNorm2d and
#: BatchNormAct2d subclass these)
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def bias_terms(model: nn.Module, *, norm_scale: bool = False) -> set[str]:
    """Names of every bias (any module's parameter named ``bias``: conv/linear biases and the
    normalisation layers' shifts β); with ``norm_scale`` also every other parameter of a
    normalisation layer (its scale γ)."""
    names = set()
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            if pname == "bias" or (norm_scale and isinstance(module, NORM_LAYERS)):
                names.add(f"{module_name}.{pname}" if module_name else pname)
    return names


class BitFitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train_norm_scale: bool = Field(
        False, description="also train the normalisation layers' scales γ (not the paper's "
        "BitFit, which trains biases only; shown in the row's label)")


@register
class BitFit(Strategy):
    """BitFit (Ben Zaken et al., ACL 2022): train only the biases (normalisation shifts
    included) and the new head."""

    name = "bitfit"
    Params = BitFitParams
    test_params = [{}, {"train_norm_scale": True}]
    description = ("BitFit (Ben Zaken et al., ACL 2022): train only the biases (normalisation "
                   "shifts β included) and the new head; every other weight frozen "
                   "(train_norm_scale: also the scales γ)")
    search_space = {"lr": LR}
    mechanism = "trainable_share"
    label_params: ClassVar[tuple[str, ...]] = ("train_norm_scale",)

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        trained = bias_terms(model, norm_scale=self.params.train_norm_scale) \
            | set(groups[-1].params)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
        self.trained = trained

    def param_groups(self) -> list[dict[str, Any]]:
        groups = []
        for i in range(len(self.groups)):
            g = self._group(i, lr=self.settings.lr)
            g["params"] = [p for p in g["params"] if p.requires_grad]
            groups.append(g)
        return groups  # groups without a bias term are dropped by build_optimizer

    def log_values(self) -> dict[str, float]:
        return super().log_values() | trainable_values(self.model)
