"""The suite's warnings as one line, ``run-benchmark: warning: <message>``, in every process.

Python's format (``/path/to/download.py:55: UserWarning: ...`` and a source line) reads like a
crash. The suite's warnings (:class:`~metalr_bench.datasets.core.errors.DatasetWarning`) name
their input in the message, so the CLI shows only that, like its errors; every other warning
keeps Python's format. Python's filters still decide what is shown (each once per place).

Why a module of its own: the CLI installs it while ``main`` runs, and a cell that runs in a
local worker process or a Ray task must print the same line, not Python's raw format, so the
executors install it around every call they run there (:func:`running.executors.call_in_worker`).
Library users, who never go through either, keep Python's behaviour. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

PREFIX = "run-benchmark: warning: "


def one_line(message: Warning | str) -> str:
    """The warning's message on one line, whatever it holds."""
    return PREFIX + " ".join(str(message).split())


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Show :class:`DatasetWarning` as one line on stderr while the block runs."""
    previous = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        # looked up, not imported: the datasets (torch) load only when a command needs them,
        # and a DatasetWarning cannot be raised before they did
        errors = sys.modules.get("metalr_bench.datasets.core.errors")
        if errors is None or not issubclass(category, errors.DatasetWarning):
            previous(message, category, filename, lineno, file, line)
            return
        from tqdm import tqdm  # write above an active progress bar, not through it

        tqdm.write(one_line(message), file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = previous
