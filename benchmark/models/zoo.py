"""The model zoo, re-exported: the one import path for the suite's models and starting weights.

The code lives in three modules that each do one thing: :mod:`.builders` (one
:class:`ModelCard` per architecture in :data:`MODELS`, timm's as ``timm:<name>``; building a
model with its layer plan attached), :mod:`.plans` (each family's
:class:`~metalr_bench.strategies.core.layers.LayerPlan`, input -> head) and :mod:`.weights`
(reading checkpoints, adapting and loading them, ImageNet weights). Imports run one way:
weights -> builders -> plans. Adding a model is one card in :mod:`.builders`, nothing in the
strategies or the config.
"""

from __future__ import annotations

from metalr_bench.benchmark.models.builders import (
    MODELS,
    TIMM_PREFIX,
    ModelCard,
    SmallCNN,
    State,
    build_model,
    get_card,
    import_timm,
    input_normalisation,
    known_archs,
)
from metalr_bench.benchmark.models.plans import timm_plan
from metalr_bench.benchmark.models.weights import (
    USCL_HEAD_PREFIXES,
    WEIGHTS_MAPPINGS,
    WeightsMismatch,
    adapt_input_conv,
    imagenet_state,
    load_state,
    map_by_position,
    read_checkpoint,
)

__all__ = [
    "MODELS",
    "TIMM_PREFIX",
    "USCL_HEAD_PREFIXES",
    "WEIGHTS_MAPPINGS",
    "ModelCard",
    "SmallCNN",
    "State",
    "WeightsMismatch",
    "adapt_input_conv",
    "build_model",
    "get_card",
    "imagenet_state",
    "import_timm",
    "input_normalisation",
    "known_archs",
    "load_state",
    "map_by_position",
    "read_checkpoint",
    "timm_plan",
]
