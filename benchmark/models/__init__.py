"""The model zoo: architectures and their starting weights.

Holds: ``zoo`` (SmallCNN, ResNet-18/50, DenseNet-121 with adapted stem and a new head;
checkpoint reading and loading; ImageNet weights) and ``tv_compat`` (torchvision's Python parts
on a mismatched torch). Layer grouping lives with the strategies
(:mod:`metalr_bench.strategies.core.layers`), which must not import the benchmark.

May import: torch, torchvision; nothing else of the suite.
"""
