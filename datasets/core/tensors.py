"""Batches on the device: data resident on the GPU where it fits, batched GPU augmentation.

Why: MedMNIST-sized sets (a few thousand 28-128 px images) fit in GPU memory many times over;
a CPU DataLoader with per-image PIL transforms is then the bottleneck, not the model. Keeping the
uint8 tensor on the device and augmenting whole batches with one ``affine_grid``/``grid_sample``
call removes host work and host-device copies from the hot loop.

Large images (ImageFolder at 224 px) go through :func:`file_loader` (a DataLoader that decodes
with PIL in worker processes); both paths yield the same ``(x, y)`` and share the augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from metalr_bench.datasets.core.base import Split


@dataclass(frozen=True)
class AugmentSpec:
    """Light, label-preserving augmentation for medical images (no colour jitter by default)."""

    hflip: bool = True
    max_rotate_deg: float = 10.0
    max_translate: float = 0.08  # fraction of the image
    scale: tuple[float, float] = (0.9, 1.1)
    #: instead of rotation/shift/scale: a random resized crop keeping this range of the image's
    #: area (aspect ratio 3/4..4/3, resized back to full size), as torchvision's
    #: RandomResizedCrop; the public MetaLR code's pipeline uses (0.8, 1.0)
    resized_crop: tuple[float, float] | None = None
    #: the crop's aspect-ratio range (width/height, log-uniform): torchvision's default 3/4..4/3;
    #: the public MetaLR code's ``ratio=(0.8, 1.25)``
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)


#: ``normalize`` values of the loaders: ``symmetric`` maps [0, 255] to [-1, 1] (every weight
#: source but ImageNet: the suite's own pre-training and random init train with it);
#: ``imagenet`` uses torchvision's ImageNet mean/std, as its ImageNet weights expect
#: (grey images: the mean of the three channels' mean and std, matching the stem whose RGB
#: filters are summed for one input channel)
#: ``metalr_public``: the public MetaLR code's ultrasound statistics, mean 0.18 / std 0.24 on
#: [0, 1] for every channel
NORMALIZATIONS = ("symmetric", "imagenet", "metalr_public")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METALR_PUBLIC_MEAN_STD = (0.18, 0.24)


def to_float(x_uint8: torch.Tensor, channels_last: bool = False,
             normalize: str = "symmetric") -> torch.Tensor:
    """uint8 (N,C,H,W) -> float, normalised (:data:`NORMALIZATIONS`); every path uses it."""
    if normalize == "imagenet":
        c = x_uint8.shape[1]
        mean = torch.tensor(IMAGENET_MEAN if c == 3 else [sum(IMAGENET_MEAN) / 3] * c,
                            device=x_uint8.device).view(1, c, 1, 1)
        std = torch.tensor(IMAGENET_STD if c == 3 else [sum(IMAGENET_STD) / 3] * c,
                           device=x_uint8.device).view(1, c, 1, 1)
        x = x_uint8.float().div_(255.0).sub_(mean).div_(std)
    elif normalize == "symmetric":
        x = x_uint8.float().div_(127.5).sub_(1.0)
    elif normalize == "metalr_public":
        mean, std = METALR_PUBLIC_MEAN_STD
        x = x_uint8.float().div_(255.0).sub_(mean).div_(std)
    else:
        raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZATIONS}")
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def augment_batch(
    x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random flip + rotation + translation + scale for a whole float batch in one warp."""
    n = x.shape[0]
    dev = x.device
    u = torch.rand(n, 5, generator=generator, device=generator.device if generator else "cpu")
    if u.device != dev:
        # a pageable host->GPU copy blocks the host until the GPU queue drains (a per-step sync);
        # pinned + non_blocking keeps the hot loop asynchronous with the same random numbers
        u = u.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else u.to(dev)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if spec.hflip else torch.ones_like(u[:, 4])
    if spec.resized_crop is not None:
        theta = _resized_crop_theta(u, spec.resized_crop, flip, spec.crop_ratio)
    else:
        theta = _affine_theta(u, spec, flip)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
        memory_format=torch.channels_last
    ) and x.shape[1] > 1 else out


def _resized_crop_theta(u: torch.Tensor, area: tuple[float, float], flip: torch.Tensor,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """A crop of ``area`` of the image (aspect ratio in ``ratio``, log-uniform, clipped to the
    image; torchvision re-samples such crops up to 10 times before a centre crop instead),
    resized to full size."""
    lo, hi = area
    a = lo + (hi - lo) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    cw, ch = torch.sqrt(a * r).clamp(max=1.0), torch.sqrt(a / r).clamp(max=1.0)
    cx, cy = (u[:, 2] * 2 - 1) * (1 - cw), (u[:, 3] * 2 - 1) * (1 - ch)
    zero = torch.zeros_like(cw)
    return torch.stack([torch.stack([cw * flip, zero, cx], 1),
                        torch.stack([zero, ch, cy], 1)], 1)


def _affine_theta(u: torch.Tensor, spec: AugmentSpec, flip: torch.Tensor) -> torch.Tensor:
    """Rotation, shift and scale (the suite's default augmentation)."""
    ang = (u[:, 0] * 2 - 1) * math.radians(spec.max_rotate_deg)
    lo, hi = spec.scale
    s = lo + (hi - lo) * u[:, 1]
    tx = (u[:, 2] * 2 - 1) * spec.max_translate * 2
    ty = (u[:, 3] * 2 - 1) * spec.max_translate * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    return torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    )


class TensorLoader:
    """Iterate (x, y) batches over an in-memory split kept on ``device``.

    Shuffling uses a dedicated ``torch.Generator`` seeded per loader so runs are reproducible and
    the loader's RNG state can be checkpointed (``state_dict``) for exact resume.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: AugmentSpec | None = None,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        normalize: str = "symmetric",
    ) -> None:
        if split.images is None:
            raise ValueError("TensorLoader needs an in-memory split; use file_loader for paths")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last and len(split) > batch_size
        self.channels_last = channels_last
        self.normalize = normalize
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        ).to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = to_float(self.images[idx], self.channels_last, self.normalize)
            if self.augment is not None:
                x = augment_batch(x, self.augment, self.generator)
            yield x, self.labels[idx]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def make_loader(
    split: Split,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    shuffle: bool = False,
    augment: AugmentSpec | None = None,
    drop_last: bool = False,
    seed: int = 0,
    channels_last: bool = False,
    num_workers: int = 0,
    image_size: int | None = None,
    in_channels: int = 1,
    normalize: str = "symmetric",
):
    """Pick the resident-tensor path for in-memory splits and the DataLoader path otherwise."""
    if split.in_memory:
        return TensorLoader(
            split, batch_size, device=device, shuffle=shuffle, augment=augment,
            drop_last=drop_last, seed=seed, channels_last=channels_last, normalize=normalize,
        )
    # imported here: files.py imports this module (to_float, augment_batch)
    from metalr_bench.datasets.core.files import FileLoader

    return FileLoader(
        split, batch_size, device=device, shuffle=shuffle, augment=augment,
        drop_last=drop_last, seed=seed, channels_last=channels_last,
        num_workers=num_workers, image_size=image_size or 224, in_channels=in_channels,
        normalize=normalize,
    )
