"""From scratch: the same architecture from a random initialisation, trained on the same budget
as every other strategy; the lower bound that shows what transfer buys.

The model is the one ``weights: none`` gives: the model zoo's own initialisation of the
architecture (torchvision's for ResNet/DenseNet: Kaiming-normal fan-out convolutions, BatchNorm
scale 1 and shift 0; timm's ``init_weights`` for a timm model), drawn right after the cell builder
seeds every RNG with the cell's seed. So seed s of ``scratch`` starts from exactly the model that
``torch.manual_seed(s)`` followed by ``build_model`` gives. Every layer then trains at the base LR
with the suite's optimizer, as ``full`` does. The run's epochs, batch size and tuning budget are
those of every other strategy, so ``scratch`` answers "what does the pre-trained start buy?" at
an equal cost. Nothing else changes: the data, the augmentation and the input normalisation the
config picks for its weights stay the same.

How: ``pretrained_start = False``, a flag the cell builder reads: it does not load the starting
weights into the model it just built. The strategy itself does nothing beyond full fine-tuning.
Built on its own (outside the cell builder) on a model that already holds pre-trained weights,
it would train them as ``full`` does.

Why a flag rather than re-initialising inside the strategy (``reset_parameters`` on every
module): PyTorch's per-module defaults are not the architectures' initialisers (torchvision's
ResNet draws its convolutions from a Kaiming-normal with fan-out, PyTorch's ``Conv2d`` default is
Kaiming-uniform with a = √5; timm models have their own ``init_weights``), so a reset would
train another network than ``weights: none`` does. The strategy layer also cannot import the
model zoo (strategies know nothing of the benchmark), so it cannot rebuild the model itself.

Drift and transferability measure how far training moved from pre-trained weights; a scratch
run has none, so the runner logs neither for it. A pre-training stage still runs (and is cached)
when the config asks for ``weights: pretrain``, since the other strategies of the grid need it.
"""

from __future__ import annotations

from metalr_bench.strategies.core.base import Strategy, register
from metalr_bench.strategies.core.space import LR


@register
class Scratch(Strategy):
    """From scratch: the same architecture from its random initialisation (cell seed), the same
    budget; the lower bound."""

    name = "scratch"
    description = ("From scratch: the same architecture from its random initialisation (seeded by "
                   "the cell's seed), every layer at the base LR, the same budget: the lower bound")
    search_space = {"lr": LR}
    pretrained_start = False
