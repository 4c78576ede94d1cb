"""Turn files on disk (an ImageFolder tree or a CSV manifest) into :class:`Records`.

Why separate from splitting and decoding: every check that can be made from names alone (missing
files, unknown labels, unmatched group patterns, duplicate rows) runs here, before any image is
decoded, and reports the folder / manifest line to fix.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from metalr_bench.datasets.core.errors import DatasetError, DatasetNotFoundError

if TYPE_CHECKING:
    from metalr_bench.datasets.folder import CsvOptions

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
_INT = re.compile(r"^\d+$")


@dataclass
class Records:
    """What a scan of the files yields, before any splitting or decoding."""

    paths: list[str]
    labels: torch.Tensor
    groups: np.ndarray
    class_names: list[str]
    multilabel: bool
    split: np.ndarray | None = None  # "train"/"val"/"test" per image, from a manifest


def group_of(name: str, pattern: re.Pattern[str] | None, default: str) -> str:
    """Group id of a file from ``pattern`` (named group ``group``, first group, whole match)."""
    if pattern is None:
        return default
    m = pattern.search(name)
    if m is None:
        raise DatasetError(
            f"group_pattern {pattern.pattern!r} does not match {name!r}; every file needs a "
            "group id (fix the pattern, or rename / exclude the file)"
        )
    if "group" in pattern.groupindex:
        return m.group("group")
    return m.group(1) if pattern.groups else m.group(0)


def scan_imagefolder(
    root: Path,
    *,
    group_pattern: str | None,
    exclude_pattern: str | None,
    class_names: list[str] | None,
) -> Records:
    """``root/<class>/**/<image>``: one folder per class, class names from the folder names."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist (root/<class>/<images>)")
    dirs = {d.name: d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    names = class_names if class_names is not None else sorted(dirs)
    if missing := [n for n in names if n not in dirs]:
        raise DatasetNotFoundError(f"class folder(s) {', '.join(missing)} not found in {root}")
    if len(names) < 2:
        raise DatasetError(f"{root} needs at least 2 class folders, found {sorted(dirs)}")
    gpat = re.compile(group_pattern) if group_pattern else None
    xpat = re.compile(exclude_pattern) if exclude_pattern else None
    paths, labels, groups = [], [], []
    for ci, name in enumerate(names):
        files = sorted(
            p
            for p in dirs[name].rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and p.is_file()
            and not p.name.startswith(".")
            and not (xpat and xpat.search(p.relative_to(dirs[name]).as_posix()))
        )
        if not files:
            raise DatasetError(
                f"class folder {dirs[name]} holds no images ({'/'.join(IMAGE_SUFFIXES)}); "
                "add images or remove the folder"
            )
        for p in files:
            rel = p.relative_to(dirs[name]).as_posix()
            paths.append(str(p.resolve()))
            labels.append(ci)
            groups.append(group_of(rel, gpat, default=f"{name}/{rel}"))
    return Records(
        paths=paths,
        labels=torch.tensor(labels, dtype=torch.int64),
        groups=np.asarray(groups, dtype=str),
        class_names=list(names),
        multilabel=False,
    )


def _single_labels(
    raw: list[str], class_names: list[str] | None, where: list[str]
) -> tuple[list[int], list[str]]:
    """Class ids from names or integer ids; class names sorted unless given."""
    for r, w in zip(raw, where, strict=True):
        if not r:
            raise DatasetError(f"{w}: empty label")
    if class_names is not None:
        index = {n: i for i, n in enumerate(class_names)}
        ids = []
        for r, w in zip(raw, where, strict=True):
            if r in index:
                ids.append(index[r])
            elif _INT.match(r) and int(r) < len(class_names):
                ids.append(int(r))
            else:
                raise DatasetError(f"{w}: label {r!r} is not one of class_names {class_names}")
        return ids, list(class_names)
    if all(_INT.match(r) for r in raw):
        ids = [int(r) for r in raw]
        return ids, [str(i) for i in range(max(ids) + 1)]
    names = sorted(set(raw))
    index = {n: i for i, n in enumerate(names)}
    return [index[r] for r in raw], names


def _multi_labels(
    raw: list[str], sep: str, class_names: list[str] | None, where: list[str]
) -> tuple[torch.Tensor, list[str]]:
    """'a|b' -> float32 (N, L) 0/1 rows; an empty cell is a row with no positive label."""
    tokens = [[t.strip() for t in r.split(sep) if t.strip()] for r in raw]
    names = (
        list(class_names) if class_names is not None else sorted({t for ts in tokens for t in ts})
    )
    index = {n: i for i, n in enumerate(names)}
    y = torch.zeros(len(raw), len(names), dtype=torch.float32)
    for row, (ts, w) in enumerate(zip(tokens, where, strict=True)):
        for t in ts:
            if t not in index:
                raise DatasetError(f"{w}: label {t!r} is not one of class_names {names}")
            y[row, index[t]] = 1.0
    return y, names


def read_manifest(manifest: Path, opts: CsvOptions) -> Records:
    """Rows ``image,label[,group][,split]`` of ``manifest``; see :class:`CsvOptions` for columns."""
    if not manifest.is_file():
        raise DatasetNotFoundError(f"manifest {manifest} does not exist")
    base = manifest.parent
    if opts.image_root is not None:
        base = (
            opts.image_root if opts.image_root.is_absolute() else manifest.parent / opts.image_root
        )
    with manifest.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if missing := [c for c in (opts.image_column, opts.label_column) if c not in cols]:
            raise DatasetError(
                f"{manifest} lacks column(s) {', '.join(missing)} (it has: {', '.join(cols)}); "
                "set image_column / label_column to the right names"
            )
        rows = list(reader)
    if not rows:
        raise DatasetError(f"manifest {manifest} has no rows")
    has_group, has_split = opts.group_column in cols, opts.split_column in cols
    gpat = re.compile(opts.group_pattern) if opts.group_pattern else None
    xpat = re.compile(opts.exclude_pattern) if opts.exclude_pattern else None
    paths, raw, groups, splits, where = [], [], [], [], []
    seen: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        w = f"{manifest}:{line}"
        img = (row.get(opts.image_column) or "").strip()
        if not img:
            raise DatasetError(f"{w}: empty {opts.image_column!r}")
        if xpat and xpat.search(img):
            continue
        p = Path(img).expanduser()
        p = (p if p.is_absolute() else base / p).resolve()
        if not p.is_file():
            raise DatasetNotFoundError(f"{w}: image {p} does not exist")
        if str(p) in seen:
            raise DatasetError(f"{w}: image {p} is listed twice (first at {seen[str(p)]})")
        seen[str(p)] = w
        gid = (row.get(opts.group_column) or "").strip() if has_group else ""
        groups.append(gid or group_of(p.name, gpat, default=str(p)))
        if has_split:
            value = (row.get(opts.split_column) or "").strip().lower()
            if value not in SPLIT_ALIASES:
                raise DatasetError(f"{w}: split {value!r} is not one of train/val/test")
            splits.append(SPLIT_ALIASES[value])
        paths.append(str(p))
        raw.append((row.get(opts.label_column) or "").strip())
        where.append(w)
    if not paths:
        raise DatasetError(f"manifest {manifest}: every row was excluded by exclude_pattern")
    multilabel = opts.task == "multi-label" or any(opts.label_separator in r for r in raw)
    if multilabel:
        labels, names = _multi_labels(raw, opts.label_separator, opts.class_names, where)
    else:
        ids, names = _single_labels(raw, opts.class_names, where)
        labels = torch.tensor(ids, dtype=torch.int64)
    return Records(
        paths=paths,
        labels=labels,
        groups=np.asarray(groups, dtype=str),
        class_names=names,
        multilabel=multilabel,
        split=np.asarray(splits, dtype=str) if has_split else None,
    )
