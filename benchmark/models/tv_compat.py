"""torchvision on a mismatched torch: the shim lives in :mod:`metalr_bench.datasets.core.tv_compat`
(the ``cifar10`` adapter needs it too, and datasets sit below the models); re-exported here for
the models and every existing import."""

from metalr_bench.datasets.core.tv_compat import import_torchvision

__all__ = ["import_torchvision"]
