"""Fetch a file over HTTP(S) and check its MD5, with messages that say how to fix a failure.

Why stdlib ``urllib``: no extra dependency, and it honours the usual proxy environment variables.
The file is written to a temporary name in the target folder and renamed only once complete, so
an interrupted download never leaves a truncated file under the real name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from metalr_bench.datasets.core.errors import ChecksumError, DatasetError, DatasetWarning
from tqdm import tqdm

_CHUNK = 1 << 20
# (path, size, mtime_ns) -> md5: large files are hashed once per process, not on every load.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def md5sum(path: Path) -> str:
    """Hex MD5 of ``path`` (cached per process on path, size and modification time)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MD5_CACHE:
        h = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        _MD5_CACHE[key] = h.hexdigest()
    return _MD5_CACHE[key]


def check_md5(path: Path, expected: str | None, *, allow_mismatch: bool) -> str:
    """MD5 of ``path``; raise if it is not ``expected`` (only warn when ``allow_mismatch``: a
    :class:`DatasetWarning`, one line naming the file)."""
    actual = md5sum(path)
    if expected is None or actual == expected:
        return actual
    if not allow_mismatch:
        raise ChecksumError(
            f"MD5 mismatch for {path}:\n"
            f"  expected {expected} (official file)\n"
            f"  actual   {actual}\n"
            "The file is not the official one (modified, truncated or a different version). "
            "Delete it and download it again, or, if you know this file is what you want, load "
            "it anyway with allow_md5_mismatch=True (CLI: --allow-md5-mismatch)."
        )
    warnings.warn(
        f"{path}: MD5 mismatch, {actual} instead of the official {expected}; loading it anyway "
        "because allow_md5_mismatch is set (results may not compare with numbers published on "
        "the official file)",
        DatasetWarning,
        stacklevel=3,
    )
    return actual


def download_url(url: str, dest: Path, *, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` through a temporary file in the same folder, with progress."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        if total is not None and tmp.stat().st_size != total:
            raise DatasetError(
                f"download of {url} stopped after {tmp.stat().st_size} of {total} bytes; try again"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        raise DatasetError(
            f"could not download {url} to {dest}: {exc}\n"
            f"Download it by hand (browser, wget) and put it at {dest}."
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
