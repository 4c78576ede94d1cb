"""``run-benchmark report``: rebuild a benchmark's report from the MLflow store.

    run-benchmark report --experiment quick
    run-benchmark report --experiment quick --tracking-uri sqlite:///mlflow.db \\
        --parent-run-id 3f2c... --output-dir benchmark-output
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run-benchmark report",
        description="Execute the report notebook for a benchmark already in MLflow and export "
        "it to HTML (code hidden), with the tidy results table as CSV and Parquet; the files "
        "are also logged on the benchmark's parent run.",
    )
    p.add_argument("--experiment", default="quick",
                   help="MLflow experiment = benchmark name (default: quick)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                   help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.add_argument("--parent-run-id", default=None,
                   help="benchmark parent run id(s), comma-separated (default: the latest)")
    p.add_argument("--output-dir", default="benchmark-output",
                   help="the report goes to OUTPUT_DIR/reports/EXPERIMENT/ (default: "
                   "benchmark-output)")
    p.add_argument("--no-log", action="store_true",
                   help="do not log the files as artifacts of the parent run")
    return p


def cmd_report(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from metalr_bench.reports.build import build_report
    from metalr_bench.reports.results import ReportDataError
    from papermill.exceptions import PapermillExecutionError

    print(f"run-benchmark report: experiment {args.experiment!r} at {args.tracking_uri}",
          flush=True)
    try:
        paths = build_report(args.tracking_uri, args.experiment, parent_run_id=args.parent_run_id,
                             output_dir=args.output_dir, log_artifacts=not args.no_log,
                             progress=True)
    except ReportDataError as exc:
        print(f"run-benchmark: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except PapermillExecutionError as exc:
        print(f"run-benchmark report: a report cell failed ({exc.ename}: {exc.evalue}); the "
              "partly executed notebook is in the output folder", file=sys.stderr)
        return 1
    for kind, path in paths.as_dict().items():
        print(f"{kind:9s} {path}")
    return 0
