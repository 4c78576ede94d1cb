"""Per-epoch checkpoints of one grid cell, so a killed cell resumes where it stopped.

Why everything, not just the weights: an exact resume (same final numbers as an uninterrupted
run) needs the optimizer's moments, the strategy's own state (MetaLR's learned LRs), the
trainer's bookkeeping (best checkpoint so far, history, global step) and every random stream
(torch CPU/CUDA, numpy, python, and the loaders' shuffling/augmentation generators).

One file per cell, ``<output_dir>/checkpoints/<config_hash>.pt``, written atomically (a temp file
then :func:`os.replace`), so a kill during the write leaves the previous epoch's file intact. It
is read with ``weights_only=True`` (no pickled code), which is why numpy's RNG state is stored as
a tensor. The file is deleted when the cell finishes or fails; only an interruption keeps it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1


class CheckpointMismatch(ValueError):
    """A resume checkpoint that does not belong to this cell's model/optimizer."""


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class CellCheckpoint:
    """The checkpoint file of one cell; ``meta`` (e.g. the MLflow run id) travels with it."""

    def __init__(self, directory: str | Path, config_hash: str) -> None:
        self.path = Path(directory) / f"{config_hash}.pt"
        self.config_hash = config_hash
        self.meta: dict[str, Any] = {}

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, trainer_state: dict[str, Any]) -> None:
        """Atomically replace the file with ``trainer_state`` (+ rng, meta, format)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "config_hash": self.config_hash, "meta": dict(self.meta),
                   "rng": capture_rng(), "trainer": trainer_state}
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        """The saved payload, or None when there is none or it is unreadable (start over)."""
        if not self.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # truncated/corrupt: safer to start the cell over than to crash
            return None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT or \
                payload.get("config_hash") != self.config_hash:
            return None
        self.meta = dict(payload.get("meta", {}))
        return payload

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
