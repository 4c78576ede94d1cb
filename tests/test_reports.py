"""Report notebooks: a tiny real benchmark -> papermill on a real kernel -> HTML checked by parsing.

One benchmark (synthetic data at 3 image sizes = 3 datasets, 2 strategies, 2 seeds) is run once
per module through ``run_benchmark`` with the report hook on; the HTML leaderboard is compared with
numbers recomputed here straight from MLflow (``MlflowClient.search_runs``), independently of
``reports.results``.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from bs4 import BeautifulSoup
from metalr_bench.benchmark.config import load_config
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.reports import stats
from metalr_bench.reports.build import build_report, template_path
from mlflow import MlflowClient
from scipy import stats as sps

SIZES = (12, 16, 20)
STRATEGIES = ("last_k", "layer_decay")  # layer_decay: a layer-wise LR figure to check
NUMBER = re.compile(r"-?\d+\.\d+")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, _mlflow_template: Path):
    """``tiny_config`` at three image sizes with two strategies; the report built by the hook."""
    tmp = tmp_path_factory.mktemp("report-bench")
    db = tmp / "mlflow.db"
    shutil.copy(_mlflow_template, db)
    uri = f"sqlite:///{db}"
    cfg = load_config(None, {
        "name": "test",
        "datasets": [{"adapter": "synthetic", "size": s, "options": {"n_patients": 48}}
                     for s in SIZES],
        "strategies": list(STRATEGIES),
        "seeds": [0, 1],
        "model": {"arch": "smallcnn", "weights": "none"},
        "epochs": 2,
        "batch_size": 16,
        "device": "cpu",
        "tracking_uri": uri,
        "output_dir": str(tmp / "out"),
    })
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed
    return cfg, outcome


def _soup(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def _mlflow_numbers(uri: str, parent: str, metric: str) -> pd.DataFrame:
    client = MlflowClient(uri)
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    return pd.DataFrame([{
        "dataset": f"{r.data.tags['dataset']}@{r.data.tags['image_size']}",
        "strategy": r.data.tags["strategy_label"], "seed": int(r.data.tags["seed"]),
        "value": r.data.metrics[metric],
    } for r in runs if r.data.tags.get("kind") == "cell"])


def test_report_built_by_the_benchmark_holds_the_right_leaderboard(bench) -> None:
    cfg, outcome = bench
    paths = outcome.report
    client = MlflowClient(cfg.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert paths is not None, parent.data.tags.get("report.status")
    assert parent.data.tags["report.status"] == "ok"
    out = Path(cfg.output_dir) / "reports" / "test"
    for p in (paths.notebook, paths.html, paths.csv, paths.parquet):
        assert p.is_file() and p.parent == out
    logged = {a.path for a in client.list_artifacts(outcome.parent_run_id, "report")}
    assert logged == {"report/report.ipynb", "report/report.html", "report/results.csv",
                      "report/results.parquet"}

    import nbformat

    nb = nbformat.read(paths.notebook, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"  # opens anywhere, not our temp kernel
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)

    # tidy table: one row per child run
    table = pd.read_parquet(paths.parquet)
    assert len(table) == len(SIZES) * len(STRATEGIES) * 2
    assert set(table["strategy"]) == set(STRATEGIES)
    assert len(pd.read_csv(paths.csv)) == len(table)

    soup = _soup(paths.html)
    assert not soup.select(".jp-CodeCell .jp-InputArea"), "code must be hidden"
    assert "def show(" not in soup.get_text()
    assert "Traceback" not in soup.get_text() and "Error" not in soup.select_one("body").get_text()
    board = soup.select_one("table#leaderboard")
    header = [th.get_text(strip=True) for th in board.select("thead th")]
    assert header[:3] == ["dataset", "strategy", "seeds"] and "AUC" in header
    auc_col = header.index("AUC")

    truth = _mlflow_numbers(cfg.tracking_uri, outcome.parent_run_id, "test_auc")
    rows = board.select("tbody tr")
    assert len(rows) == len(SIZES) * len(STRATEGIES)
    seen = set()
    for tr in rows:
        cells = tr.select("td")
        ds, strategy = cells[0].get_text(strip=True), cells[1].get_text(strip=True)
        seen.add((ds, strategy))
        values = truth[(truth.dataset == ds) & (truth.strategy == strategy)]["value"].to_numpy()
        assert len(values) == 2 and int(cells[2].get_text()) == 2
        mean, std = values.mean(), values.std(ddof=1)
        half = sps.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))
        shown = [float(x) for x in NUMBER.findall(cells[auc_col].get_text(" "))]
        np.testing.assert_allclose(shown, [mean, std, max(mean - half, 0), min(mean + half, 1)],
                                   atol=6e-4)
        best = truth[truth.dataset == ds].groupby("strategy")["value"].mean().max()
        assert (cells[auc_col].find("strong") is not None) == math.isclose(mean, best)
    assert seen == {(f"synthetic@{s}", st) for s in SIZES for st in STRATEGIES}

    # average rank recomputed from the same numbers
    means = truth.groupby(["dataset", "strategy"])["value"].mean().unstack()
    expected_rank = (-means).rank(axis=1).mean()
    for tr in soup.select("table#average-rank tbody tr"):
        cells = [td.get_text(strip=True) for td in tr.select("td")]
        assert float(cells[1]) == pytest.approx(expected_rank[cells[0]], abs=0.006)

    # paired tests name their test; with 2 seeds it is the paired t-test
    tests = [tr.select("td")[4].get_text(strip=True) for tr in
             soup.select("table#paired-tests tbody tr")]
    assert len(tests) == len(SIZES) and all(t in ("paired t-test", "no test (identical results)")
                                            for t in tests)

    figures = {img["alt"] for img in soup.select("img.metalr-figure")}
    assert {"critical-difference diagram", "learning curves", "learning rate per layer group",
            "drift heat-map", "cost per strategy"} <= figures
    for img in soup.select("img.metalr-figure"):
        assert img["src"].startswith("data:image/png;base64,") and len(img["src"]) > 5000
    text = soup.get_text(" ")
    assert "Friedman χ²" in text and "No Optuna study" in text
    assert soup.select_one("table#provenance") is not None

    # the answer opens the report: a sentence per dataset and one across the three
    first = soup.find(["h2"])
    assert first is not None and first.get_text(strip=True).startswith("The answer")
    best, flat = means.idxmax(axis=1), " ".join(text.split())
    for ds in means.index:
        assert f"{ds} : {best[ds]} is best on AUC" in flat
    assert f"Across the {len(SIZES)} datasets" in flat
    assert "heat-map of each strategy's paired gain over full" not in figures  # no `full` here
    assert "No published reference for these datasets" in text


def test_a_failing_cell_fails_the_build(bench, tmp_path: Path) -> None:
    from papermill.exceptions import PapermillExecutionError

    cfg, outcome = bench
    broken = tmp_path / "broken.py"
    text = template_path().read_text()
    marker = "# %%\nimport warnings"  # the first cell after the parameters
    assert marker in text
    broken.write_text(text.replace(marker, "# %%\nraise RuntimeError('broken cell')\n\n" + marker))
    with pytest.raises(PapermillExecutionError, match="broken cell"):
        build_report(cfg.tracking_uri, cfg.name, parent_run_id=outcome.parent_run_id,
                     output_dir=tmp_path / "out", template=broken, log_artifacts=False)


def test_report_for_an_unknown_experiment_says_what_exists(bench, tmp_path: Path) -> None:
    from metalr_bench.reports.results import ReportDataError

    cfg, _ = bench
    with pytest.raises(ReportDataError, match="existing: .*test"):
        build_report(cfg.tracking_uri, "nope", output_dir=tmp_path, log_artifacts=False)


def test_cli_report_flags(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from metalr_bench.benchmark.cli import _run_parser, main, overrides_from_args

    assert overrides_from_args(_run_parser().parse_args(["--no-report"]))["report"] is False
    assert "report" not in overrides_from_args(_run_parser().parse_args([]))
    cfg, _ = bench
    rc = main(["report", "--experiment", "missing", "--tracking-uri", cfg.tracking_uri,
               "--output-dir", str(tmp_path)])
    assert rc == 2 and "no MLflow experiment named 'missing'" in capsys.readouterr().err


def test_ci_and_paired_tests_match_scipy() -> None:
    x = np.array([0.80, 0.82, 0.85, 0.79])
    m, s, lo, hi, n = stats.mean_ci(x)
    lo2, hi2 = sps.t.interval(0.95, 3, loc=x.mean(), scale=sps.sem(x))
    assert (m, n) == (pytest.approx(x.mean()), 4) and (lo, hi) == (pytest.approx(lo2),
                                                                   pytest.approx(hi2))
    a = pd.Series([0.8, 0.82, 0.85], index=[0, 1, 2])
    b = pd.Series([0.7, 0.75, 0.8, 0.9], index=[0, 1, 2, 3])  # seed 3 has no partner
    t = stats.paired_test(a, b)
    assert t.test == "paired t-test" and t.n_pairs == 3
    assert t.p_value == pytest.approx(sps.ttest_rel(a, b.loc[:2]).pvalue)
    a6, b6 = pd.Series(np.arange(6) * 0.01 + 0.9), pd.Series(np.arange(6) * 0.013 + 0.8)
    assert stats.paired_test(a6, b6).test == "Wilcoxon signed-rank"


def test_friedman_nemenyi_matches_scipy_and_demsar() -> None:
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(rng.random((6, 4)), columns=list("ABCD"))
    res = stats.friedman_nemenyi(scores)
    ref = sps.friedmanchisquare(*[scores[c] for c in scores])
    assert res.statistic == pytest.approx(ref.statistic) and res.p_value == pytest.approx(
        ref.pvalue)
    # Demšar (2006), table 5: q_0.05 = 2.569 for k = 4 -> CD = 2.569 * sqrt(4*5 / (6*6))
    assert res.cd == pytest.approx(2.569 * math.sqrt(20 / 36), abs=1e-3)
    assert list(res.avg_ranks.index) == list(
        (-scores).rank(axis=1).mean().sort_values().index)
    assert stats.cliques(pd.Series([1.0, 1.5, 3.5], index=list("abc")), 1.0) == [["a", "b"]]
