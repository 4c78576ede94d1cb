"""Image files decoded on demand: the path-based counterpart of :class:`TensorLoader`.

Why a second loader: 224 px ImageFolder/CSV datasets do not fit in memory as one tensor, so they
are decoded with PIL in DataLoader workers. Everything after decoding (float conversion,
augmentation, the seeded shuffling generator and its checkpointed state) is shared with
:class:`~metalr_bench.datasets.core.tensors.TensorLoader`, and :func:`decode_image` is the same
function the in-memory adapters use, so both paths yield the same tensors for the same files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from metalr_bench.datasets.core.base import Split
from metalr_bench.datasets.core.errors import CorruptDataError
from metalr_bench.datasets.core.tensors import AugmentSpec, augment_batch, to_float
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit grey (common in medical PNG/TIFF) -> 8 bit by scaling, not by clipping."""
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    arr = np.asarray(im, dtype=np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if im.mode.startswith("I;16") or (im.mode == "I" and peak > 255):
        hi = 65535.0
    elif im.mode == "F":
        hi = max(peak, 1.0)  # float images: [0, 1] or [0, max]
    else:
        hi = 255.0
    return Image.fromarray(np.clip(arr / hi * 255 + 0.5, 0, 255).astype(np.uint8))


def decode_image(path: str, size: int, channels: int) -> torch.Tensor:
    """Decode ``path`` with PIL to a uint8 ``(channels, size, size)`` tensor.

    EXIF orientation is applied (photos from phones and dermatoscopes), alpha is dropped, and the
    image is resized to a square ``size`` (mixed source sizes are expected in clinical data).
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = _to_8bit(im).convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CorruptDataError(
            f"cannot read image {path}: {exc}. Replace or remove the file (is it truncated or "
            "not an image?)"
        ) from exc
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def is_grey(path: str) -> bool:
    """Whether ``path`` is a grey-scale image, read from the header only (no decoding)."""
    try:
        with Image.open(path) as im:
            return im.mode in GREY_MODES
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CorruptDataError(
            f"cannot read image {path}: {exc}. Replace or remove the file (is it truncated or "
            "not an image?)"
        ) from exc


class ImageFiles(Dataset):
    """``(uint8 CHW image, label)`` per file; picklable, so it works in worker processes."""

    def __init__(
        self, paths: Sequence[str], labels: torch.Tensor, image_size: int, channels: int
    ) -> None:
        self.paths = list(paths)
        self.labels = labels
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_image(self.paths[i], self.image_size, self.channels), self.labels[i]


class FileLoader:
    """Iterate ``(x, y)`` batches over a path-based split, like :class:`TensorLoader`.

    The batch order comes from this loader's own seeded generator (not the DataLoader's), drawn
    the same way as in ``TensorLoader``: for the same split, seed and batch size both loaders
    visit the samples in the same order and apply the same augmentation.
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
        num_workers: int = 0,
        image_size: int = 224,
        in_channels: int = 1,
    ) -> None:
        if split.paths is None:
            raise ValueError("FileLoader needs a path-based split; use TensorLoader for images")
        self.device = torch.device(device)
        self.dataset = ImageFiles(split.paths, split.labels, image_size, in_channels)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last and len(split) > batch_size
        self.channels_last = channels_last
        self.normalize = normalize
        self.num_workers = num_workers
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        batches = [
            order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            for b in range(len(self))
        ]
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        non_blocking = self.device.type == "cuda"
        for xb, yb in loader:
            x = to_float(xb.to(self.device, non_blocking=non_blocking), self.channels_last,
                         self.normalize)
            if self.augment is not None:
                x = augment_batch(x, self.augment, self.generator)
            yield x, yb.to(self.device, non_blocking=non_blocking)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
