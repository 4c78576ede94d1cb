"""MkDocs hooks for the documentation site (mkdocs.yml, `hooks:`).

1. The API reference (mkdocstrings) needs the import namespace ``metalr_bench``, whose four
   packages live in the top-level folders ``benchmark``, ``strategies``, ``datasets`` and
   ``reports`` (pyproject's ``package-dir``). An editable install maps them with an import hook
   that griffe's static search does not follow, so this hook builds the namespace as a tree of
   symlinks under ``build/mkdocs-ns`` (mkdocs.yml's handler ``paths``) before anything is
   collected: the site builds from a fresh clone with only ``pip install -e .[test]``, without
   the developers' ``.ns`` shim on PYTHONPATH.
2. BENCHMARKS.md and CHANGELOG.md live at the repository root (where GitHub shows them); they
   become the site's ``benchmarks.md`` and ``changelog.md`` with their links into ``docs/``
   rewritten, so ``mkdocs build --strict`` checks those links too.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "strategies", "datasets", "reports")
ROOT_PAGES = {"BENCHMARKS.md": "benchmarks.md", "CHANGELOG.md": "changelog.md"}


@event_priority(100)  # before mkdocstrings reads its handler paths
def on_config(config):
    ns = ROOT / "build" / "mkdocs-ns" / "metalr_bench"
    if ns.exists():
        shutil.rmtree(ns)
    ns.mkdir(parents=True)
    for pkg in PACKAGES:
        (ns / pkg).symlink_to(ROOT / pkg, target_is_directory=True)
    return config


def _site_links(text: str) -> str:
    """Root-relative links (GitHub's view) -> the site's: docs/x.md -> x.md, README -> home."""
    text = re.sub(r"\]\(docs/", "](", text)
    text = re.sub(r"\]\(README\.md", "](index.md", text)
    for src, dest in ROOT_PAGES.items():
        text = text.replace(f"]({src}", f"]({dest}")
    return text


def on_files(files: Files, config) -> Files:
    for src, dest in ROOT_PAGES.items():
        path = ROOT / src
        if path.exists():
            files.append(File.generated(config, dest, content=_site_links(path.read_text())))
    return files
