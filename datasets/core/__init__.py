"""What every dataset adapter shares.

Holds: ``base`` (``Split``, ``DatasetBundle``, ``TaskType``), ``errors``, ``registry``
(discovery by package scan and entry points, ``load_dataset``), ``splits`` (group-aware splits,
k-fold), ``tensors`` (device-resident batches, GPU augmentation), ``files`` (the DataLoader path
for large images), ``scan`` (image folders and CSV manifests), ``download``,
``medmnist_info`` (the MedMNIST catalogue) and ``meta`` (the meta sources: where a
meta-learning strategy's meta batches come from, with their resume position).

May import: torch, numpy, PIL, pydantic; never the benchmark or the strategies.
"""
