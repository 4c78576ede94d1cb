"""Build a report: template (.py) -> notebook -> executed by papermill -> HTML, CSV, Parquet.

Why a jupytext ``.py`` template: it diffs and reviews like code. Why papermill on a real
kernel: the report is an ordinary notebook the user can open, re-run and change, and a failing
cell fails the build (``PapermillExecutionError``). The kernel is registered for *this*
interpreter in a temporary ``JUPYTER_PATH`` entry, so the build works in a fresh venv without
``python -m ipykernel install``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from metalr_bench.benchmark.tracking.client import Tracker, absolute_tracking_uri

log = logging.getLogger(__name__)

TEMPLATE = "benchmark_report.py"
KERNEL_NAME = "metalr-bench-report"


@dataclass(frozen=True)
class ReportPaths:
    notebook: Path
    html: Path
    csv: Path
    parquet: Path
    parent_run_id: str

    def as_dict(self) -> dict[str, Path]:
        return {"notebook": self.notebook, "html": self.html, "csv": self.csv,
                "parquet": self.parquet}


def template_path(name: str = TEMPLATE) -> Path:
    return Path(str(resources.files("metalr_bench.reports") / "templates" / name))


@contextlib.contextmanager
def kernel_for_this_python() -> Iterator[str]:
    """A kernelspec running ``sys.executable`` on ``JUPYTER_PATH`` while the block runs."""
    from ipykernel.kernelspec import write_kernel_spec

    with tempfile.TemporaryDirectory(prefix="metalr-kernel-") as tmp:
        write_kernel_spec(Path(tmp) / "kernels" / KERNEL_NAME, overrides={
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.log_level=ERROR"],  # no TCP-encryption chatter
            "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} "
                            "(metalr-bench)",
        })
        with _on_jupyter_path([tmp]):
            yield KERNEL_NAME


def _jupyter_data_dirs() -> list[str]:
    """The base interpreter's ``share/jupyter`` too: a ``--system-site-packages`` venv imports
    nbconvert from there but jupyter_core only looks under the venv's ``sys.prefix``."""
    out = []
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, sys.exec_prefix]):
        d = Path(prefix) / "share" / "jupyter"
        if (d / "nbconvert" / "templates").is_dir():
            out.append(str(d))
    return out


@contextlib.contextmanager
def _on_jupyter_path(dirs: list[str]) -> Iterator[None]:
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([*dirs, *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


def to_html(notebook: Path, html_path: Path) -> Path:
    """Export with code cells hidden: readers see text, tables and figures."""
    import nbformat
    from nbconvert import HTMLExporter

    with _on_jupyter_path(_jupyter_data_dirs()):
        exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                                exclude_output_prompt=True)
        body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
    html_path.write_text(body, encoding="utf-8")
    return html_path


def export_results(tracking_uri: str, experiment: str, parent_run_id: str | None,
                   out: Path) -> tuple[Path, Path, str]:
    """The tidy one-row-per-run table as CSV and Parquet; returns the resolved parent id."""
    from metalr_bench.reports.results import load_runs, results_table

    runs = load_runs(tracking_uri, experiment, parent_run_id)
    table = results_table(runs)
    out.mkdir(parents=True, exist_ok=True)  # once there is something to report: a bad
    # experiment or parent run id leaves no folder behind
    csv, parquet = out / "results.csv", out / "results.parquet"
    table.to_csv(csv, index=False)
    table.to_parquet(parquet, index=False)
    return csv, parquet, ",".join(runs.parent_ids)


def build_report(
    tracking_uri: str,
    experiment: str,
    *,
    parent_run_id: str | None = None,
    output_dir: str | Path = "benchmark-output",
    template: str | Path | None = None,
    parameters: dict[str, Any] | None = None,
    log_artifacts: bool = True,
    progress: bool = False,
    timeout_s: int = 600,
) -> ReportPaths:
    """Execute the report for ``experiment`` and write it to ``<output_dir>/reports/<experiment>/``.

    Raises :class:`papermill.PapermillExecutionError` when a cell fails (the partly executed
    notebook is still written, with the error, for debugging) and
    :class:`~metalr_bench.reports.results.ReportDataError` when there is nothing to report.
    """
    import jupytext
    import nbformat
    import papermill

    tracking_uri = absolute_tracking_uri(tracking_uri)  # the kernel runs in another folder
    out = Path(output_dir) / "reports" / experiment
    csv, parquet, parents = export_results(tracking_uri, experiment, parent_run_id, out)
    nb = jupytext.read(Path(template) if template else template_path())
    with tempfile.TemporaryDirectory(prefix="metalr-report-") as tmp:
        source = Path(tmp) / "report.source.ipynb"
        nbformat.write(nb, source)
        notebook = out / "report.ipynb"
        params = {"tracking_uri": tracking_uri, "experiment": experiment,
                  "parent_run_id": parents, "output_dir": str(out.resolve()),
                  **(parameters or {})}
        with kernel_for_this_python() as kernel:
            papermill.execute_notebook(
                str(source), str(notebook), parameters=params, kernel_name=kernel,
                progress_bar=progress, cwd=str(out), execution_timeout=timeout_s,
            )
        # the temporary kernel is gone: point the saved notebook at the standard one
        done = nbformat.read(notebook, as_version=4)
        done.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
        nbformat.write(done, notebook)
    html = to_html(notebook, out / "report.html")
    paths = ReportPaths(notebook, html, csv, parquet, parents.split(",")[0])
    if log_artifacts:
        tracker = Tracker(tracking_uri, experiment)
        for p in paths.as_dict().values():
            tracker.log_artifact(paths.parent_run_id, p, "report")
        tracker.set_tags(paths.parent_run_id, {"report.status": "ok",
                                               "report.html": str(html.resolve())})
    return paths


def report_after_benchmark(cfg: Any, parent_run_id: str, *, progress: bool = True
                           ) -> ReportPaths | None:
    """The runner's hook: build the report; a failure becomes a warning tag, not a crash."""
    if progress:
        print("building the report notebook ...", file=sys.stderr, flush=True)
    try:
        return build_report(cfg.tracking_uri, cfg.name, parent_run_id=parent_run_id,
                            output_dir=cfg.output_dir, progress=progress)
    except Exception as exc:  # noqa: BLE001 - the benchmark's results are safe in MLflow
        log.warning("report failed: %s: %s", type(exc).__name__, exc)
        with contextlib.suppress(Exception):
            Tracker(cfg.tracking_uri, cfg.name).set_tags(parent_run_id, {
                "report.status": f"failed: {type(exc).__name__}: {str(exc)[:4000]}"})
        return None
