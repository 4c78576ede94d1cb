"""MkDocs hooks for the documentation site (mkdocs.yml, `hooks:`).

1. The API reference (mkdocstrings) reads the import namespace ``metalr_bench`` from the
   committed tree of relative symlinks ``.namespace/metalr_bench/<package> -> ../../<package>``
   (mkdocs.yml's handler ``paths``; mypy reads the same tree): an editable install maps the four
   folders with an import hook that griffe's static search does not follow, so the site builds
   from a fresh clone with only ``pip install -e .[test]``, without a PYTHONPATH shim.
2. BENCHMARKS.md and CHANGELOG.md live at the repository root (where GitHub shows them); they
   become the site's ``benchmarks.md`` and ``changelog.md`` with their links into ``docs/``
   rewritten, so ``mkdocs build --strict`` checks those links too.
3. A page may include a marked part of a root file, said once there: a line
   ``--8<-- "README.md:setup"`` takes what README.md holds between ``<!-- --8<-- [start:setup] -->``
   and ``<!-- --8<-- [end:setup] -->``, links rewritten for the page (the README's set-up
   commands are the getting-started page's). A missing file or part fails the build.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError
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


INCLUDE = re.compile(r'^--8<-- "(?P<file>[^":]+):(?P<part>[\w-]+)"\s*$', re.M)


def _part(name: str, part: str) -> str:
    text = (ROOT / name).read_text()
    start, end = f"<!-- --8<-- [start:{part}] -->", f"<!-- --8<-- [end:{part}] -->"
    if start not in text or end not in text:
        raise PluginError(f"{name} has no part {part!r} (markers {start} ... {end})")
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def _relative(text: str, depth: int) -> str:
    """Links written from docs/ (the site's root) as seen from a page `depth` folders down."""
    if not depth:
        return text
    return re.sub(r"\]\((?![a-z]+:|#|/)", "](" + "../" * depth, text)


def on_page_markdown(markdown: str, page, config, files) -> str:
    depth = page.file.src_uri.count("/")
    return INCLUDE.sub(
        lambda m: _relative(_site_links(_part(m["file"], m["part"])), depth), markdown)


def on_files(files: Files, config) -> Files:
    for src, dest in ROOT_PAGES.items():
        path = ROOT / src
        if path.exists():
            files.append(File.generated(config, dest, content=_site_links(path.read_text())))
    return files
