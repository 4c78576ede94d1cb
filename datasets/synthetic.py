"""A deterministic, medical-looking dataset generated in code: no download, tests run anywhere.

Why this shape: transfer learning only shows its value when a *source* task teaches features
that a small, *shifted target* task can reuse. Both domains draw grey-scale "scans" of an organ
(an ellipse on a smooth background) that may hold a lesion:

* source (``synthetic-source``, for the pre-training stage): 4 classes, no lesion / round
  lesion / irregular lesion / several lesions, high contrast, little noise, many images;
* target (``synthetic``, the benchmark's default): binary benign (round, smooth margin) vs
  malignant (lobulated, spiculated margin), lower contrast, speckle noise, a brightness shift, few
  images, 2 views per patient. Splits are patient-level so the two views of one patient never land
  on both sides.

Everything is vectorised numpy seeded by ``seed``: the same seed gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from metalr_bench.datasets.core.base import DatasetBundle, Split, TaskType
from metalr_bench.datasets.core.registry import register_dataset
from metalr_bench.datasets.core.splits import group_train_val_test
from pydantic import BaseModel, ConfigDict, Field


class SyntheticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_patients: int = Field(350, ge=12, description="patients; each gives `views` images")
    views: int = Field(2, ge=1, le=8)
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    test_fraction: float = Field(0.4, gt=0, lt=0.8)


class SyntheticSourceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_images: int = Field(2400, ge=40)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ax = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    return yy[None], xx[None]


def _lesion_mask(
    yy: np.ndarray, xx: np.ndarray, cy, cx, r0, amp, freq, phase, softness
) -> np.ndarray:
    """Soft mask of a lesion with radius r(θ) = r0·(1 + amp·sin(freq·θ + phase))."""
    dy, dx = yy - cy[:, None, None], xx - cx[:, None, None]
    dist = np.sqrt(dy**2 + dx**2)
    theta = np.arctan2(dy, dx)
    radius = r0[:, None, None] * (
        1 + amp[:, None, None] * np.sin(freq[:, None, None] * theta + phase[:, None, None])
    )
    return 1 / (1 + np.exp(-(radius - dist) / softness[:, None, None]))


def _scans(
    rng: np.random.Generator,
    size: int,
    lesion_kind: np.ndarray,
    *,
    contrast: float,
    noise: float,
    brightness: float,
    lesion_params: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one image per entry of ``lesion_kind`` (0 none, 1 round, 2 irregular, 3 several)."""
    n = len(lesion_kind)
    yy, xx = _grid(size)
    # Background: smooth low-frequency texture plus an elliptic organ.
    bg = np.zeros((n, size, size), np.float32)
    for _ in range(3):
        fy, fx = rng.uniform(0.5, 2.5, (2, n, 1, 1))
        ph = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        bg += 0.05 * np.sin(np.pi * (fy * yy + fx * xx) + ph)
    ay, ax = rng.uniform(0.55, 0.85, (2, n, 1, 1))
    oy, ox = rng.uniform(-0.1, 0.1, (2, n, 1, 1))
    organ = 1 / (1 + np.exp(-(1 - ((yy - oy) / ay) ** 2 - ((xx - ox) / ax) ** 2) / 0.05))
    img = 0.25 + bg + 0.25 * organ

    if lesion_params is None:
        lesion_params = {
            "cy": rng.uniform(-0.3, 0.3, n),
            "cx": rng.uniform(-0.3, 0.3, n),
            "r0": rng.uniform(0.14, 0.24, n),
            "amp": np.where(lesion_kind == 2, rng.uniform(0.18, 0.4, n), rng.uniform(0, 0.12, n)),
            "freq": np.where(lesion_kind == 2, rng.integers(5, 9, n), rng.integers(2, 4, n)).astype(
                np.float32
            ),
            "phase": rng.uniform(0, 2 * np.pi, n),
            "softness": np.where(lesion_kind == 2, 0.01, 0.03) * rng.uniform(0.7, 1.3, n),
            "sign": rng.choice([-1.0, 1.0], n, p=[0.3, 0.7]),
        }
    p = lesion_params
    jitter = rng.normal(0, 0.03, (2, n))  # a second view of a patient moves the probe a little
    mask = _lesion_mask(
        yy, xx, p["cy"] + jitter[0], p["cx"] + jitter[1], p["r0"], p["amp"], p["freq"],
        p["phase"] + rng.normal(0, 0.1, n), p["softness"],
    )
    has = (lesion_kind > 0)[:, None, None]
    img = img + has * p["sign"][:, None, None] * 0.35 * mask
    several = lesion_kind == 3
    if several.any():  # two extra small round lesions
        for _ in range(2):
            m2 = _lesion_mask(
                yy, xx, rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n),
                rng.uniform(0.06, 0.1, n), np.zeros(n), np.ones(n), np.zeros(n),
                np.full(n, 0.02),
            )
            img = img + several[:, None, None] * 0.3 * m2

    img = brightness + contrast * (img - 0.5) + 0.5
    speckle = rng.gamma(4.0, 0.25, img.shape).astype(np.float32)  # multiplicative, mean 1
    img = img * (1 + noise * (speckle - 1)) + noise * 0.3 * rng.normal(0, 1, img.shape)
    out = np.clip(img * 255, 0, 255).astype(np.uint8)[:, None]
    return out, lesion_params


@register_dataset(
    "synthetic",
    options=SyntheticOptions,
    description="binary benign/malignant lesions, patient-level splits (the quick benchmark)",
)
def load_synthetic(
    *,
    root: Path | None,
    size: int,
    seed: int,
    download: bool,
    allow_md5_mismatch: bool,
    n_patients: int = 350,
    views: int = 2,
    val_fraction: float = 0.2,
    test_fraction: float = 0.4,
) -> DatasetBundle:
    """The target domain. ``seed`` is ignored on purpose: the dataset is fixed, seeds vary runs."""
    rng = np.random.default_rng(20230808)
    malignant = (rng.random(n_patients) < 0.4).astype(np.int64)
    kind = np.where(malignant == 1, 2, 1)
    # ~8% hard cases: a malignant lesion with an almost round margin, a benign lobulated one.
    hard = rng.random(n_patients) < 0.08
    kind = np.where(hard, 3 - kind, kind)
    images, params = [], None
    for _ in range(views):
        img, params = _scans(
            rng, size, kind, contrast=0.75, noise=0.18, brightness=-0.08, lesion_params=params
        )
        images.append(img)
    x = np.stack(images, 1).reshape(n_patients * views, 1, size, size)
    y = np.repeat(malignant, views)
    groups = np.repeat(np.arange(n_patients), views)
    full = Split(labels=torch.from_numpy(y), images=torch.from_numpy(x), groups=groups)
    train, val, test = group_train_val_test(
        full, val_fraction=val_fraction, test_fraction=test_fraction, seed=0, stratify=True
    )
    return DatasetBundle(
        name="synthetic",
        task=TaskType.BINARY,
        class_names=["benign", "malignant"],
        in_channels=1,
        image_size=size,
        train=train,
        val=val,
        test=test,
        info={"source": "generated in code (metalr_bench.datasets.synthetic)"},
    )


@register_dataset(
    "synthetic-source",
    options=SyntheticSourceOptions,
    description="4-class source domain used by the `pretrain` stage",
)
def load_synthetic_source(
    *,
    root: Path | None,
    size: int,
    seed: int,
    download: bool,
    allow_md5_mismatch: bool,
    n_images: int = 2400,
) -> DatasetBundle:
    """The pre-training domain: plenty of clean images, a richer 4-class task."""
    rng = np.random.default_rng(1234)
    kind = rng.integers(0, 4, n_images)
    x, _ = _scans(rng, size, kind, contrast=1.0, noise=0.1, brightness=0.05)
    full = Split(labels=torch.from_numpy(kind.astype(np.int64)), images=torch.from_numpy(x))
    n_val = max(n_images // 10, 4)
    perm = np.random.default_rng(0).permutation(n_images)
    val, train = full.subset(perm[:n_val]), full.subset(perm[n_val:])
    return DatasetBundle(
        name="synthetic-source",
        task=TaskType.MULTICLASS,
        class_names=["none", "round", "irregular", "several"],
        in_channels=1,
        image_size=size,
        train=train,
        val=val,
        test=val,
        info={"source": "generated in code (metalr_bench.datasets.synthetic)"},
    )
