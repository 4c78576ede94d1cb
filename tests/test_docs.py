"""The words around the code: the README's test command is CI's, the README stays a five-minute
read, and the docs name every strategy (the MLflow filter examples of docs/mlflow.md are run
against a real store in test_end_to_end.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _test_command(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("pip install") and "[test" in ln]
    assert len(lines) == 1, lines
    return lines[0].strip()


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert _test_command(readme) == _test_command(ci)
    for step in ("ruff check .", "lint-imports", "mypy", "mkdocs build --strict", "pytest"):
        assert step in _test_command(ci), step


def test_readme_is_a_five_minute_read_that_opens_with_the_answer() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    headings = re.findall(r"^## (.+)$", readme, flags=re.M)
    assert headings[0].startswith("The answer"), headings
    figure = re.search(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert figure and (ROOT / figure.group(1)).is_file()


def test_every_nav_page_exists_and_drafts_stay_out_of_the_site() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    pages = re.findall(r":\s+([\w/.-]+\.md)\s*$", config, flags=re.M)
    generated = {"benchmarks.md", "changelog.md"}  # docs/hooks.py makes them from the root files
    missing = [p for p in pages if p not in generated and not (ROOT / "docs" / p).is_file()]
    assert not missing, missing
    assert "drafts/" in config.split("exclude_docs:", 1)[1].split("\n\n", 1)[0]
