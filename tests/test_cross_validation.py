"""Cross-validation as a grid dimension, and datasets that keep their names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bs4 import BeautifulSoup
from metalr_bench.benchmark.config import validate_config
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.benchmark.training.cell import DataCache
from mlflow import MlflowClient
from test_folder import PATTERN, make_folder


@pytest.fixture
def frames(tmp_path: Path) -> Path:
    """A lung-ultrasound-like frame folder: 3 classes x 6 videos x 3 frames, video = group."""
    root = tmp_path / "pocus-frames"
    make_folder(root, classes=("covid", "pneumonia", "regular"), videos=6, frames=3,
                sizes=((24, 24),))
    return root


def _cv_config(tiny_config: dict[str, Any], root: Path, **extra: Any) -> dict[str, Any]:
    return {**tiny_config, "seeds": [0], "epochs": 1, "strategies": ["full", "last_k"],
            "datasets": [{"adapter": "imagefolder", "root": str(root), "size": 16,
                          "options": {"group_pattern": PATTERN, "n_folds": 3}, **extra}]}


def test_n_folds_runs_every_fold_under_its_own_name(tiny_config, frames) -> None:
    """`n_folds` without `fold` expands into one cell per fold; every run is named and tagged
    by the folder's name and its fold (they used to merge as `imagefolder@16`), no video is in
    two folds' test sets, each run logs its test predictions, and the report pools the folds."""
    published = {"dataset": "pocus-frames", "size": 16, "model": "ResNet-18", "citation": "P, Tab. 1",
                 "metrics": {"auc": 0.9}, "weights": "ImageNet"}
    cfg = validate_config(_cv_config(tiny_config, frames, ) | {"report": True,
                                                                "references": [published]})
    cells = cfg.cells()
    assert len(cells) == 6
    assert sorted({c.dataset.dataset_key for c in cells}) == [
        "pocus-frames-fold0@16", "pocus-frames-fold1@16", "pocus-frames-fold2@16"]
    data = DataCache()
    tests = [set(data.get(c).test.groups.tolist()) for c in cells if c.strategy == "full"]
    assert sum(len(t) for t in tests) == len(set().union(*tests)) == 18  # 3 classes x 6 videos

    outcome = run_benchmark(cfg, progress=False)
    assert [r.status for r in outcome.results] == ["FINISHED"] * 6
    client = MlflowClient(cfg.tracking_uri)
    runs = [client.get_run(r.run_id) for r in outcome.results]
    names = {r.data.tags["mlflow.runName"] for r in runs}
    assert len(names) == 6 and all(n.startswith("pocus-frames-fold") for n in names)
    assert {(r.data.tags["dataset"], r.data.tags["fold"], r.data.tags["cv_group"])
            for r in runs if r.data.tags["strategy"] == "full"} == {
        (f"pocus-frames-fold{k}", str(k), "pocus-frames") for k in range(3)}
    assert {r.data.tags["dataset.adapter"] for r in runs} == {"imagefolder"}
    for r, cell in zip(runs, outcome.results, strict=True):
        local = client.download_artifacts(r.info.run_id, "predictions/test.csv")
        lines = Path(local).read_text().splitlines()
        assert lines[0] == "label,prob.covid,prob.pneumonia,prob.regular"
        assert len(lines) - 1 == len(data.get(cell.cell).test)

    html = Path(outcome.report.html).read_text()
    assert 'id="cv-leaderboard"' in html and 'id="cv-pooled"' in html
    assert "pooled confusion matrices of pocus-frames@16" in html
    assert 'id="cv-paired-tests"' in html  # paired on (fold, seed)
    # folds of one dataset are not datasets: one block in the average rank, no Friedman test
    # across datasets (it used to print "Friedman ... (3 datasets ...)" over the 3 folds)
    soup = BeautifulSoup(html, "html.parser")
    assert [th.get_text(strip=True) for th in soup.select("table#average-rank thead th")] == [
        "strategy", "average rank", "datasets", "pocus-frames@16"]
    text = soup.get_text(" ")
    assert "Friedman χ²" not in text and "there is 1 dataset" in text
    # a published row beside the folds' datasets, unranked, with its protocol in the note
    rows = [[td.get_text(" ", strip=True) for td in tr.select("td")]
            for tr in soup.select("table#leaderboard-published tbody tr")]
    ours = [r for r in rows if r[2] == "this benchmark"]
    theirs = [r for r in rows if r[1] == "ResNet-18 published"]
    assert len(ours) == 6 and theirs and all(r[-1] == "published" and "0.900" in r
                                             for r in theirs)
    assert "starting weights: ImageNet" in text


def test_two_image_folders_with_the_same_options_stay_apart(tiny_config, tmp_path) -> None:
    """Two folders (say BUSI next to POCUS) used to share `config_hash` (the root is left out
    of it), so the second was skipped as already FINISHED, and both were `imagefolder`."""
    for name in ("busi", "pocus"):
        make_folder(tmp_path / name, videos=4, frames=2, sizes=((20, 20),))
    base = {**tiny_config, "seeds": [0], "epochs": 1, "strategies": ["full"]}
    ds = [{"adapter": "imagefolder", "root": str(tmp_path / n), "size": 16,
           "options": {"group_pattern": PATTERN}} for n in ("busi", "pocus")]
    cfg = validate_config({**base, "datasets": ds})
    outcome = run_benchmark(cfg, progress=False)
    assert [(r.cell.dataset.dataset_key, r.status, r.skipped) for r in outcome.results] == [
        ("busi@16", "FINISHED", False), ("pocus@16", "FINISHED", False)]
    labelled = validate_config({**base, "datasets": [{**ds[0], "label": "BUSI-2018"}]})
    assert labelled.cells()[0].dataset.dataset_key == "BUSI-2018@16"
    with pytest.raises(ValueError, match="label"):
        validate_config({**base, "datasets": [{**ds[0], "label": "a/b"}]})


def test_a_fold_without_n_folds_is_refused(tiny_config, frames) -> None:
    bad = _cv_config(tiny_config, frames)
    bad["datasets"][0]["options"] = {"group_pattern": PATTERN, "fold": 1}
    with pytest.raises(ValueError, match="fold needs n_folds"):
        validate_config(bad)
    one = _cv_config(tiny_config, frames)
    one["datasets"][0]["options"]["fold"] = 2  # one fold only: no expansion
    assert [c.dataset.dataset_key for c in validate_config(one).cells()] == [
        "pocus-frames-fold2@16"] * 2


@pytest.mark.parametrize("name", sorted(
    p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_load(name: str) -> None:
    """Every ready-made grid in configs/ is a valid config (the paper protocol: 5 folds)."""
    from metalr_bench.benchmark.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert cfg.cells()
    if name == "metalr-pocus":
        assert sorted({c.dataset.dataset_name for c in cfg.cells()}) == [
            f"pocus-fold{k}" for k in range(5)]
        assert cfg.model.weights_mapping == "positional" and cfg.batch_size == 128


def test_report_builds_when_strategies_share_a_param_name_of_other_types(tiny_config) -> None:
    """metalr's `hyper_lr` is a number, hd's defaults to None (per optimizer): the report's
    Parquet export failed on the mixed column (ArrowTypeError), so the grid of every strategy
    on real data ended without a report."""
    cfg = validate_config({**tiny_config, "strategies": ["metalr", "hd"], "seeds": [0],
                           "epochs": 1, "report": True})
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed
    assert outcome.report is not None and Path(outcome.report.parquet).is_file()
