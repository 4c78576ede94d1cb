"""MkDocs hooks for the documentation site (mkdocs.yml, `hooks:`).

1. The API reference (mkdocstrings) reads the import namespace ``metalr_bench`` from the
   committed tree of relative symlinks ``.namespace/metalr_bench/<package> -> ../../<package>``
   (mkdocs.yml's handler ``paths``; mypy reads the same tree): an editable install maps the four
   folders with an import hook that griffe's static search does not follow, so the site builds
   from a fresh clone with only ``pip install -e .[test]``, without a PYTHONPATH shim.
2. BENCHMARKS.md and CHANGELOG.md live at the repository root (where GitHub shows them); they
   become the site's ``benchmarks.md`` and ``changelog.md`` with their links into ``docs/``
   rewritten, so ``mkdocs build --strict`` checks those links too.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
ROOT_PAGES = {"BENCHMARKS.md": "benchmarks.md", "CHANGELOG.md": "changelog.md"}




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
