"""Dataset adapters: every adapter returns a :class:`~metalr_bench.datasets.core.base.DatasetBundle`.

Holds: one module per adapter (``synthetic``, ``medmnist``, ``folder`` for ImageFolder/CSV, and
any other module dropped in here) and ``core/`` (bundles, splits, device-resident tensors, the
registry). Adapters register themselves by name (``@register_dataset``); the registry finds
them by scanning this package and the ``metalr_bench.datasets`` entry points, so a new dataset
is one file. ``load_dataset`` is the one entry point the runner uses.

May import: torch, numpy, PIL, pydantic; never the benchmark or the strategies (import-linter).
"""

from metalr_bench.datasets.core.base import DatasetBundle, Split, TaskType
from metalr_bench.datasets.core.errors import DatasetError
from metalr_bench.datasets.core.registry import available_datasets, load_dataset

__all__ = [
    "DatasetBundle",
    "DatasetError",
    "Split",
    "TaskType",
    "available_datasets",
    "load_dataset",
]
