"""TensorLoader: epoch coverage, seeded shuffling, exact resume, and batched augmentation."""

from __future__ import annotations

import pytest
import torch
from metalr_bench.datasets.core.base import Split
from metalr_bench.datasets.core.tensors import (
    AugmentSpec,
    TensorLoader,
    augment_batch,
    make_loader,
    to_float,
)

IDENTITY = AugmentSpec(hflip=False, max_rotate_deg=0.0, max_translate=0.0, scale=(1.0, 1.0))


def split(n: int = 23, c: int = 1, s: int = 8) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g)
    return Split(labels=torch.arange(n), images=images)


def epoch(loader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


@pytest.mark.parametrize(("batch", "shuffle"), [(5, False), (5, True), (23, True), (64, True)])
def test_every_sample_once_per_epoch(batch: int, shuffle: bool) -> None:
    loader = TensorLoader(split(), batch, shuffle=shuffle, seed=1)
    for _ in range(2):
        seen = epoch(loader)
        assert sorted(seen) == list(range(23))
    assert len(loader) == -(-23 // batch)
    if not shuffle:
        assert epoch(loader) == list(range(23))


def test_drop_last() -> None:
    loader = TensorLoader(split(), 5, shuffle=True, drop_last=True)
    batches = [y for _, y in loader]
    assert len(loader) == len(batches) == 4 and all(len(y) == 5 for y in batches)
    small = TensorLoader(split(3), 5, drop_last=True)  # never drop the only batch
    assert len(small) == 1 and epoch(small) == [0, 1, 2]


def test_shuffle_is_reproducible_and_seeded() -> None:
    a, b, c = (TensorLoader(split(), 5, shuffle=True, seed=s) for s in (7, 7, 8))
    ea, eb, ec = epoch(a), epoch(b), epoch(c)
    assert ea == eb and ea != ec
    assert epoch(a) != ea  # the next epoch is a new permutation


def test_state_dict_resumes_the_same_order() -> None:
    loader = TensorLoader(split(), 5, shuffle=True, seed=3, augment=AugmentSpec())
    epoch(loader)
    state = loader.state_dict()
    expected = [(x.clone(), y.clone()) for x, y in loader]
    fresh = TensorLoader(split(), 5, shuffle=True, seed=99, augment=AugmentSpec())
    fresh.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, fresh, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_batches_are_normalised_floats() -> None:
    s = Split(
        labels=torch.tensor([0, 1]),
        images=torch.tensor([0, 255], dtype=torch.uint8)
        .view(2, 1, 1, 1)
        .expand(2, 1, 4, 4)
        .contiguous(),
    )
    ((x, y),) = list(make_loader(s, 2))
    assert x.dtype == torch.float32 and x.shape == (2, 1, 4, 4)
    assert torch.all(x[0] == -1) and torch.all(x[1] == 1)
    assert torch.equal(to_float(s.images), x)


def test_augmentation_keeps_shape_and_changes_pixels() -> None:
    x = to_float(split(16, c=3, s=16).images)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, AugmentSpec(), g)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5  # border padding, no new range
    changed = (out - x).abs().flatten(1).amax(1) > 1e-3
    assert changed.all()
    again = augment_batch(x, AugmentSpec(), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded


def test_zero_parameter_augmentation_is_identity() -> None:
    x = to_float(split(8, c=3, s=12).images)
    out = augment_batch(x, IDENTITY, torch.Generator().manual_seed(1))
    assert torch.allclose(out, x, atol=1e-5)


def test_flip_only_is_an_exact_mirror_or_identity() -> None:
    x = to_float(split(32, s=10).images)
    spec = AugmentSpec(hflip=True, max_rotate_deg=0.0, max_translate=0.0, scale=(1.0, 1.0))
    out = augment_batch(x, spec, torch.Generator().manual_seed(2))
    same = (out - x).abs().flatten(1).amax(1) < 1e-5
    mirrored = (out - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_make_loader_picks_the_tensor_path() -> None:
    assert isinstance(make_loader(split(), 4), TensorLoader)
    with pytest.raises(ValueError, match="in-memory split"):
        TensorLoader(Split(labels=torch.zeros(1, dtype=torch.long), paths=["x.png"]), 1)
