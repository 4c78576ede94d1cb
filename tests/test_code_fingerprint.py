"""The cell identity notices code changes by itself (``benchmark.fingerprint``).

The fault: ``CODE_VERSION`` stayed 0.1.0 through many result-changing commits, so a re-run after
an upgrade skipped cells the old code had computed. Here the fingerprint reads a copy of the
package tree that the test edits, as an upgrade would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from metalr_bench.benchmark import fingerprint as fp
from metalr_bench.benchmark.config import load_config
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.reports import tables
from metalr_bench.reports.results import load_runs, results_table
from metalr_bench.strategies.core.registry import get_strategy
from mlflow import MlflowClient

#: the checkout (or installed tree) the package is imported from
REPO = fp.source_path("metalr_bench.benchmark").parent


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the package's source the fingerprint reads instead of the real one."""
    copy = tmp_path / "src"
    for folder in ("benchmark", "strategies", "datasets", "reports"):
        shutil.copytree(REPO / folder, copy / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    real = fp.source_path

    def redirected(module: str) -> Path:
        path = real(module)
        try:
            return copy / path.relative_to(REPO)
        except ValueError:  # outside the package (a test's strategy module)
            return path

    monkeypatch.setattr(fp, "source_path", redirected)
    fp.cache_clear()
    yield copy
    fp.cache_clear()


def _edit(path: Path) -> None:
    """A code change: a new constant at the end of the module."""
    path.write_text(path.read_text() + "\n_CHANGED_BY_A_TEST = 1\n")
    fp.cache_clear()


def test_editing_a_strategy_reruns_its_cells_only(tiny_config, tree: Path) -> None:
    cfg = load_config(None, {**tiny_config, "seeds": [0], "epochs": 1,
                             "strategies": ["full", "last_k"]})
    first = {r.cell.strategy: r for r in run_benchmark(cfg, progress=False).results}
    assert all(r.status == "FINISHED" and not r.skipped for r in first.values())

    _edit(tree / "strategies" / "last_k.py")
    second = {r.cell.strategy: r for r in run_benchmark(cfg, progress=False).results}
    assert second["full"].skipped and second["full"].run_id == first["full"].run_id
    assert not second["last_k"].skipped, "last_k's code changed: its cell must run again"
    assert second["last_k"].status == "FINISHED"
    assert second["last_k"].config_hash != first["last_k"].config_hash

    # every run logs the fingerprint (tag and param); the new last_k run carries the new one
    client = MlflowClient(cfg.tracking_uri)
    logged = {rid: client.get_run(rid).data for rid in
              (first["full"].run_id, first["last_k"].run_id, second["last_k"].run_id)}
    for data in logged.values():
        assert data.tags["code_fingerprint"] == data.params["code_fingerprint"]
    assert (logged[first["last_k"].run_id].tags["code_fingerprint"]
            != logged[second["last_k"].run_id].tags["code_fingerprint"])


def test_shared_code_changes_every_cell_and_the_cli_none(tree: Path) -> None:
    full, metalr, public = (get_strategy(n) for n in ("full", "metalr", "metalr_public"))

    def prints() -> tuple[str, str, str]:
        return tuple(fp.code_fingerprint(s) for s in (full, metalr, public))

    start = prints()
    assert len(set(start)) == 3
    _edit(tree / "benchmark" / "cli.py")  # the CLI, reports, tracking: no result changes
    _edit(tree / "reports" / "tables.py")
    _edit(tree / "benchmark" / "tracking" / "tags.py")
    assert prints() == start
    _edit(tree / "strategies" / "metalr.py")  # metalr_public inherits MetaLR: both change
    after_metalr = prints()
    assert after_metalr[0] == start[0]
    assert after_metalr[1] != start[1] and after_metalr[2] != start[2]
    _edit(tree / "benchmark" / "training" / "trainer.py")  # the loop: every cell
    after_trainer = prints()
    assert all(a != b for a, b in zip(after_trainer, after_metalr, strict=True))
    _edit(tree / "datasets" / "core" / "splits.py")
    assert all(a != b for a, b in zip(prints(), after_trainer, strict=True))


def test_fingerprint_is_part_of_hash_study_and_params(tree: Path) -> None:
    from metalr_bench.benchmark.tuning.space import search_space
    from metalr_bench.benchmark.tuning.studies import study_name

    cfg = load_config(None, {"strategies": ["full"], "seeds": [0]})
    (cell,) = cfg.cells()
    space = search_space("full", 5, {})

    def ids() -> tuple[str, str, str]:
        return (cfg.config_hash(cell), study_name(cfg, cell.dataset, "full", {}, space),
                cfg.cell_params(cell)["code_fingerprint"])

    before = ids()
    _edit(tree / "strategies" / "full.py")
    assert all(a != b for a, b in zip(ids(), before, strict=True))


def test_report_warns_when_a_leaderboard_mixes_code(tiny_config, tree: Path) -> None:
    cfg = load_config(None, {**tiny_config, "seeds": [0], "epochs": 1, "strategies": ["full"]})
    run_benchmark(cfg, progress=False)
    df = results_table(load_runs(cfg.tracking_uri, cfg.name))
    assert tables.mixed_code_warning(df) is None
    _edit(tree / "strategies" / "full.py")
    cfg2 = cfg.model_copy(update={"seeds": [1]})
    outcome = run_benchmark(cfg2, progress=False)
    assert not outcome.results[0].skipped
    both = load_runs(cfg.tracking_uri, cfg.name, _parents(cfg.tracking_uri, cfg.name))
    warning = tables.mixed_code_warning(results_table(both))
    assert warning is not None and "full" in warning and "2 code versions" in warning


def _parents(uri: str, name: str) -> list[str]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'benchmark'")
    return [r.info.run_id for r in runs]


def test_a_cached_pretraining_is_not_reused_by_changed_code(tree: Path) -> None:
    """The pre-training cache follows the code too: a checkpoint the old trainer wrote is not
    the one the new code would write, so a re-run after an upgrade must not start every cell
    from it (the old key held ``CODE_VERSION`` only, which nobody bumps). Code that trains no
    number (reports) keeps it."""
    from metalr_bench.benchmark.config import PretrainSpec
    from metalr_bench.benchmark.training.pretrain import pretrain_key

    spec = PretrainSpec(dataset="pneumoniamnist")
    before = pretrain_key("resnet18", spec, 28)
    _edit(tree / "reports" / "tables.py")
    assert pretrain_key("resnet18", spec, 28) == before
    _edit(tree / "benchmark" / "training" / "trainer.py")
    assert pretrain_key("resnet18", spec, 28) != before


def test_every_run_names_the_code_it_came_from(mlflow_uri):
    """`mlflow.source.name` and, in a git checkout (this test runs from one), the commit: the
    MLflow UI's Source column read "-" for every run (issue 39)."""
    import subprocess

    from metalr_bench.benchmark.tracking.client import Tracker
    from mlflow import MlflowClient

    here = Path(__file__).resolve().parent
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=here).stdout.strip()
    tracker = Tracker(mlflow_uri, "source")
    with tracker.run("parent", {"kind": "benchmark"}) as parent, \
            tracker.run("child", {"kind": "cell"}, parent_id=parent) as child:
        pass
    for run_id in (parent, child):
        tags = MlflowClient(mlflow_uri).get_run(run_id).data.tags
        assert tags["mlflow.source.type"] == "LOCAL"
        assert Path(tags["mlflow.source.name"]) == here.parent  # the checkout's root
        assert tags["mlflow.source.git.commit"] == commit
