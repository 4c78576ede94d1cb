"""Dataset adapters: every adapter returns a :class:`~metalr_bench.datasets.base.DatasetBundle`.

Adapters register themselves by name in :data:`~metalr_bench.datasets.registry.DATASETS`;
``load_dataset(spec)`` is the one entry point the runner uses.
"""

from metalr_bench.datasets.base import DatasetBundle, Split, TaskType
from metalr_bench.datasets.errors import DatasetError
from metalr_bench.datasets.registry import available_datasets, load_dataset

__all__ = [
    "DatasetBundle",
    "DatasetError",
    "Split",
    "TaskType",
    "available_datasets",
    "load_dataset",
]
