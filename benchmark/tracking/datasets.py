"""A run's training, validation and test data in MLflow's own terms (``log_inputs``).

Why: the MLflow UI's *Dataset* column and its dataset filter only know data logged as run
inputs; a tag or param holding a path does not show there. Each cell run logs one
:class:`~mlflow.entities.Dataset` per split it reads (``mlflow.log_input``'s equivalent for an
explicit run id: :meth:`MlflowClient.log_inputs` with :class:`DatasetInput` s):

* ``name``: the dataset key (``pneumoniamnist@28``, ``busi@64``: the dataset name at its size);
* ``digest``: the content of what was read, combined with the split's name (MLflow keeps one
  input per name and digest; the content's own digest is ``content_digest`` in the profile). A MedMNIST file: its MD5 (the loader computed it
  already); another file (a CSV manifest, a POCUS file) or a folder (an image folder): a SHA-256
  over every file's bytes and relative path, so an edited or added image changes it and two
  runs on different data are told apart. Data generated in code (synthetic): a hash of the
  generator's settings, which decide its content;
* ``source``: the file or folder (``{"uri": ...}``, source type ``local``), or the generator;
* the split as the input's ``mlflow.data.context`` tag (``train``, ``val``, ``test``); the
  profile holds the number of images per split.

Torch-free (the import contract of ``tracking``): it reads files with hashlib, not datasets.
File digests are cached per process by (path, size, mtime), so a grid hashes each file once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag

CONTEXT_TAG = "mlflow.data.context"  # the tag MLflow's UI shows as the input's context
#: MLflow's column for a digest holds 36 characters
DIGEST_LEN = 32
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (cached by path, size and mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


def content_digest(path: str | Path) -> str:
    """Digest of a file, or of a folder (every file below it: relative path and bytes)."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)[:DIGEST_LEN]
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames.sort()
        for name in sorted(filenames):
            f = Path(dirpath) / name
            h.update(f"{f.relative_to(p).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()[:DIGEST_LEN]


def _location(info: dict[str, str]) -> str | None:
    """The file or folder the loader read (``file`` for MedMNIST, ``source`` for the others)."""
    for key in ("file", "source"):
        value = info.get(key)
        if value and Path(value).exists():
            return value
    return None


def dataset_inputs(dataset_key: str, info: dict[str, str], spec: dict[str, Any],
                   split_sizes: dict[str, int]) -> list[DatasetInput]:
    """The inputs of a run that reads ``split_sizes``' splits of the dataset ``dataset_key``.

    ``info``: the loader's :attr:`DatasetBundle.info`; ``spec``: the dataset entry (its
    settings decide generated data).
    """
    location = _location(info)
    if location is not None:
        md5 = info.get("md5")
        digest = md5[:DIGEST_LEN] if md5 and "file" in info else content_digest(location)
        source_type = "local"
        source = json.dumps({"uri": Path(location).resolve().as_uri()})
    else:  # generated in code: its settings decide the content
        settings = {k: v for k, v in spec.items() if k not in ("root", "download", "label")}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                                ).hexdigest()[:DIGEST_LEN]
        source_type = "code"
        source = json.dumps({"generator": info.get("source", "code"), "settings": settings},
                            default=str)
    profile = json.dumps({f"num_{k}": n for k, n in split_sizes.items()}
                         | {"content_digest": digest})
    return [DatasetInput(Dataset(name=dataset_key, digest=split_digest(digest, split),
                                 source_type=source_type, source=source, profile=profile),
                         tags=[InputTag(CONTEXT_TAG, split)])
            for split in split_sizes]


def split_digest(content: str, split: str) -> str:
    """One split's digest: the content's and the split's name. MLflow keeps one input per
    (name, digest) and run, so three splits under one digest would show as one."""
    return hashlib.sha256(f"{content}\0{split}".encode()).hexdigest()[:DIGEST_LEN]
