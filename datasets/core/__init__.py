"""What every dataset adapter shares.

Holds: ``base`` (``Split``, ``DatasetBundle``, ``TaskType``), ``errors``, ``registry``
(discovery by package scan and entry points, ``load_dataset``), ``splits`` (group-aware splits,
k-fold), ``tensors`` (device-resident batches, GPU augmentation), ``files`` (the DataLoader path
for large images), ``scan`` (image folders and CSV manifests), ``download`` and
``medmnist_info`` (the MedMNIST catalogue).

May import: torch, numpy, PIL, pydantic; never the benchmark or the strategies.
"""
