"""The model zoo: architectures and their starting weights.

Holds: ``builders`` (one ``ModelCard`` per architecture in ``MODELS``: SmallCNN, ResNet-18/50,
DenseNet-121 with adapted stem and a new head, and any timm model as ``timm:<name>``; each built
model carries its ``LayerPlan``), ``plans`` (the layer plans, one per family), ``weights``
(checkpoint reading and loading; ImageNet weights), ``zoo`` (re-exports all three: the import
path the rest of the suite uses) and ``tv_compat`` (torchvision's Python parts on a mismatched
torch). Inside, imports run one way: weights -> builders -> plans. The models own their layer
grouping; the strategies only read it (:mod:`metalr_bench.strategies.core.layers`, which defines
the plan's type because strategies must not import the benchmark).

May import: torch, torchvision, timm, and ``metalr_bench.strategies.core.layers``; nothing of the
benchmark (the config imports the zoo to validate ``model.arch``).
"""
