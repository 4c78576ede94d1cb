"""Which code a run came from, as MLflow's own ``mlflow.source.*`` tags.

Why: the suite starts its runs through ``MlflowClient`` (not ``mlflow.start_run`` from a
script), so MLflow sets no source tags, and the UI's *Source* column read "-" for every run.
With them it shows the checkout a run came from and, where the code is a git checkout, its
commit (the *Version* column). The cell identity uses the code fingerprint
(:mod:`benchmark.fingerprint`), not these: they are for people, and say nothing about edits
not yet committed (tag ``code.git_dirty`` says whether there are any).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
GIT_COMMIT = "mlflow.source.git.commit"
GIT_REPO_URL = "mlflow.source.git.repoURL"
GIT_DIRTY = "code.git_dirty"  # not an MLflow key: outside its reserved mlflow.*


def _git(folder: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=folder)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.cache
def source_tags() -> dict[str, str]:
    """``mlflow.source.name`` (the checkout's root folder, or the installed package's folder),
    ``mlflow.source.type`` LOCAL, and when the code is a git checkout its commit, whether it
    has uncommitted edits and its ``origin`` URL. Once per process (a few ``git`` calls)."""
    package = Path(__file__).resolve().parents[2]  # the folder holding benchmark/
    root = _git(package, "rev-parse", "--show-toplevel")
    tags = {SOURCE_NAME: root or str(package), SOURCE_TYPE: "LOCAL"}
    commit = _git(package, "rev-parse", "HEAD") if root else None
    if commit:
        tags[GIT_COMMIT] = commit
        status = _git(package, "status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags[GIT_DIRTY] = "true" if status else "false"
        url = _git(package, "remote", "get-url", "origin")
        if url:
            tags[GIT_REPO_URL] = url
    return tags
