"""BitFit (Ben Zaken, Ravfogel & Goldberg, ACL 2022, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models"): train only the bias terms, and the
new task head, of the pre-trained network.

    trained = {b : every bias of the backbone} ∪ {γ, β : every normalisation layer} ∪ head

For a CNN the bias terms are the convolution/linear biases and the affine shift and scale of the
normalisation layers (BatchNorm, GroupNorm, LayerNorm): a torchvision ResNet's convolutions have
no bias, so there BitFit trains the BatchNorm γ, β and the head (the variant CNN studies of
BitFit use). Every other parameter gets ``requires_grad=False``: it gets no gradient, so no
optimizer (weight decay included) moves it and no optimizer state is kept for it.

BatchNorm layers stay in train mode, so their running statistics adapt to the target data like
their shifts and scales; the trainer's PreciseBN re-estimates them before each evaluation, as for
every strategy. The reference freezes nothing else (there is no dropout to speak of here).

Logged each epoch: ``trainable_params`` (the count) and ``trainable_share`` (trained parameters /
all parameters), the figure that shows the mechanism acted, next to each group's LR.

Deviations, and why: the paper trains the biases of a BERT (linear and LayerNorm layers); which
parameters of a CNN count as "bias terms" is our reading, the one its CNN follow-ups use. The
paper tunes the LR over {1e-4, 4e-4, 7e-4, 1e-3} with AdamW; here the base LR is tuned like
every strategy's (the same range and budget), with the suite's optimizer.
"""

from __future__ import annotations

from typing import Any

from metalr_bench.strategies.core.base import Strategy, register, trainable_values
from metalr_bench.strategies.core.space import LR
from torch import nn

#: normalisation layers whose affine scale and shift BitFit trains (timm's LayerNorm2d and
#: BatchNormAct2d subclass these)
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def bias_terms(model: nn.Module) -> set[str]:
    """Names of every bias (any module's parameter named ``bias``) and every parameter of a
    normalisation layer (its scale γ and shift β)."""
    names = set()
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            if pname == "bias" or isinstance(module, NORM_LAYERS):
                names.add(f"{module_name}.{pname}" if module_name else pname)
    return names


@register
class BitFit(Strategy):
    """BitFit (Ben Zaken et al., ACL 2022): train only biases, normalisation scales/shifts and
    the new head."""

    name = "bitfit"
    description = ("BitFit (Ben Zaken et al., ACL 2022): train only the biases, the normalisation "
                   "layers' scales/shifts and the new head; every other weight frozen")
    search_space = {"lr": LR}
    mechanism = "trainable_share"

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        trained = bias_terms(model) | set(groups[-1].params)
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
