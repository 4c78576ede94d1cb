"""Conformance: every registered strategy (× its ``test_params``) and every dataset adapter
through the same checks (benchopt's ``test_benchmarks.py`` idea).

A new strategy is covered by adding its file (its ``test_params`` are the cases); a new adapter
by adding its file and one fixture below (:data:`ADAPTER_FIXTURES`; a test fails until it has
one). Per strategy case, through the one cell builder:

* it trains: every logged value of two epochs (train/val numbers, the strategy's
  ``log_values``, test metrics, drift) is finite, and the mechanism key is logged when declared;
* a state round-trip: those two epochs straight vs the first epoch's checkpoint and one resumed
  epoch in a fresh trainer give bit-identical weights and per-epoch numbers.

Per adapter: a tiny file set in its format loads into a consistent bundle (shapes, labels in
range, train/val/test without a shared group) and trains one epoch of ``full`` with finite
numbers. Tiny on purpose: smallcnn, 16 px synthetic data, batches of 8.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from metalr_bench.benchmark.config import Cell, load_config
from metalr_bench.benchmark.training import cell as cell_mod
from metalr_bench.benchmark.training.checkpoint import CellCheckpoint
from metalr_bench.datasets.core.medmnist_info import INFO
from metalr_bench.datasets.core.registry import available_datasets
from metalr_bench.strategies.core.registry import available_strategies, get_strategy
from test_cifar10 import write_official
from test_folder import PATTERN, make_folder
from test_medmnist import write_npz
from test_pocus import SIDE, fake_pickle

CASES = [pytest.param(name, params, id=f"{name}-{i}")
         for name in available_strategies()
         for i, params in enumerate(get_strategy(name).test_params)]


def _config(tmp_path: Path, dataset: dict[str, Any], **extra: Any) -> Any:
    return load_config(None, {
        "name": "conformance", "datasets": [dataset], "strategies": ["full"], "seeds": [0],
        "model": {"arch": "smallcnn", "weights": "none"}, "epochs": 2, "batch_size": 8,
        "eval_batch_size": 64, "device": "cpu", "deterministic": True, "report": False,
        "tracking_uri": f"sqlite:///{tmp_path / 'unused.db'}", "output_dir": str(tmp_path),
        **extra,
    })


SYNTHETIC = {"adapter": "synthetic", "size": 16, "options": {"n_patients": 24}}


def _finite(values: dict[str, Any], where: str) -> None:
    bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, f"{where}: non-finite values {bad}"


def _run(cfg: Any, cell: Cell, *, epochs: int, checkpoint: CellCheckpoint | None = None,
         resume: dict[str, Any] | None = None) -> Any:
    bundle = cell_mod.DataCache().get(cell)
    return cell_mod.train_cell(cfg, cell, bundle, None, epochs=epochs, checkpoint=checkpoint,
                               resume=resume, artifacts=False)


class _KeepFirst(CellCheckpoint):
    """A checkpoint that also keeps the payload written after the first epoch."""

    def save(self, trainer_state: dict[str, Any]) -> None:
        super().save(trainer_state)
        if trainer_state["epoch"] == 0:
            self.first = self.load()


@pytest.mark.parametrize(("name", "params"), CASES)
def test_trains_with_finite_values_and_resumes_exactly(tmp_path: Path, name: str,
                                                       params: dict) -> None:
    """Two epochs (a strategy may need two: lp_ft probes one, then fine-tunes) through the cell
    builder, then the same cell from the checkpoint of its first epoch."""
    cfg = _config(tmp_path, SYNTHETIC)
    cell = Cell(dataset=cfg.datasets[0], strategy=name, params=params, seed=0)
    ckpt = _KeepFirst(tmp_path / "ckpt", "straight")
    straight = _run(cfg, cell, epochs=2, checkpoint=ckpt)
    for epoch, record in enumerate(straight.history):
        _finite(record, f"{name} {params} epoch {epoch}")
    _finite(straight.summary(), f"{name} {params} summary")
    _finite(straight.drift, f"{name} {params} drift")
    assert straight.test and straight.final_state is not None
    # the mechanism's figure: every epoch, or once at the end for a mechanism that acts there
    # (WiSE-FT's chosen α: ``Strategy.final_values``, logged with the final metrics)
    mechanism = get_strategy(name).mechanism
    assert (mechanism is None or all(mechanism in r for r in straight.history)
            or mechanism in straight.final_values), (
        f"{name} declares mechanism {mechanism!r} but logs it neither every epoch nor at the end")

    assert ckpt.first is not None and ckpt.first["trainer"]["epoch"] == 0
    resumed = _run(cfg, cell, epochs=2, resume=ckpt.first)

    def numbers(r: Any) -> list[dict[str, float]]:
        return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in r.history]

    assert numbers(resumed) == numbers(straight)
    assert straight.final_state is not None and resumed.final_state is not None
    assert straight.final_state.keys() == resumed.final_state.keys()
    for k, v in straight.final_state.items():
        assert torch.equal(v, resumed.final_state[k]), f"{name} {params}: {k} differs"
    assert resumed.test == straight.test


# -- adapters ---------------------------------------------------------------------------------
def _medmnist(flag: str) -> Callable[[Path], dict[str, Any]]:
    def make(root: Path) -> dict[str, Any]:
        write_npz(root, flag, 28, counts=(24, 8, 8))
        return {"root": str(root), "size": 28, "allow_md5_mismatch": True}

    return make


def _pocus(root: Path) -> dict[str, Any]:
    root.mkdir(parents=True)
    fake_pickle(root / "pocus_data_all.pkl", sizes=(10, 10, 10, 10, 10))
    return {"root": str(root), "size": SIDE, "options": {"fold": 0}}


def _imagefolder(root: Path) -> dict[str, Any]:
    make_folder(root / "us")
    return {"root": str(root / "us"), "size": 16, "options": {"group_pattern": PATTERN}}


def _csv(root: Path) -> dict[str, Any]:
    files = make_folder(root / "imgs")
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "group"])
        for p in files:
            w.writerow([p.relative_to(root).as_posix(), p.parent.name, p.name.split("_")[0]])
    return {"root": str(root), "size": 16}


def _cifar10(root: Path) -> dict[str, Any]:
    write_official(root)  # the official pickles, tiny: their MD5s are not torchvision's
    return {"root": str(root), "size": 16, "allow_md5_mismatch": True,
            "options": {"val_fraction": 0.25, "cache_dir": str(root / "cache")}}


#: adapter name -> ``make(tmp_dir) -> dataset entry of a config`` (tiny files in its format)
ADAPTER_FIXTURES: dict[str, Callable[[Path], dict[str, Any]]] = {
    **{flag: _medmnist(flag) for flag in INFO},
    "pocus": _pocus,
    "imagefolder": _imagefolder,
    "csv": _csv,
    "cifar10": _cifar10,
    "synthetic": lambda root: dict(SYNTHETIC),
    "synthetic-source": lambda root: {"size": 16, "options": {"n_images": 48}},
}


def test_every_adapter_has_a_fixture() -> None:
    missing = sorted(set(available_datasets()) - set(ADAPTER_FIXTURES))
    assert not missing, (f"adapters without a conformance fixture: {missing}; add one to "
                         "tests/test_conformance.py ADAPTER_FIXTURES")


@pytest.mark.filterwarnings("ignore::UserWarning")  # the test files are not the official ones
@pytest.mark.parametrize("adapter", available_datasets())
def test_adapter_bundle_trains_one_epoch(tmp_path: Path, adapter: str) -> None:
    if adapter not in ADAPTER_FIXTURES:
        pytest.fail(f"no conformance fixture for adapter {adapter!r}")
    entry = {"adapter": adapter, **ADAPTER_FIXTURES[adapter](tmp_path / "data")}
    cfg = _config(tmp_path, entry)
    cell = Cell(dataset=cfg.datasets[0], strategy="full", params={}, seed=0)
    bundle = cell_mod.DataCache().get(cell)
    splits = {"train": bundle.train, "val": bundle.val, "test": bundle.test}
    n_classes = len(bundle.class_names)
    for split_name, split in splits.items():
        assert len(split) > 0, f"{adapter}: empty {split_name} split"
        labels = split.labels
        assert int(labels.min()) >= 0 and int(labels.max()) < max(n_classes, 2), (
            f"{adapter}: {split_name} labels outside the {n_classes} classes")
        if split.in_memory:
            assert split.images.dtype == torch.uint8
            assert tuple(split.images.shape[1:]) == (bundle.in_channels, bundle.image_size,
                                                     bundle.image_size), adapter
    if bundle.train.groups is not None:
        groups = {k: set(s.groups.tolist()) for k, s in splits.items() if s.groups is not None}
        assert not groups["train"] & groups.get("test", set()), f"{adapter}: train/test share a group"
        assert not groups["train"] & groups.get("val", set()), f"{adapter}: train/val share a group"
    result = cell_mod.train_cell(cfg, cell, bundle, None, epochs=1, artifacts=False)
    _finite(result.history[0], f"{adapter} epoch 0")
    _finite(result.summary(), f"{adapter} summary")
