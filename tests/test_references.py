"""Published numbers beside ours (config `references:` -> parent run -> report), a pre-training
source per dataset, the shipped full-budget grid, and the cost table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from bs4 import BeautifulSoup
from metalr_bench.benchmark.config import ConfigError, load_config, validate_config
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.datasets.core.medmnist_info import INFO
from metalr_bench.reports import cost, references
from metalr_bench.reports import results as res
from metalr_bench.reports.tables import leaderboard
from mlflow import MlflowClient

CONFIGS = Path(__file__).parents[1] / "configs"
ROW = {"dataset": "synthetic", "size": 16, "model": "ResNet-18 (28)",
       "metrics": {"auc": 0.944, "acc": 0.854}, "citation": "Paper, Table 3",
       "train_images": 4708, "weights": "random initialisation", "selection": "best val AUC"}


def test_reference_rows_are_typed_with_clear_errors(tiny_config, tmp_path) -> None:
    cfg = validate_config({**tiny_config, "references": [ROW]})
    assert cfg.references[0].metrics == {"auc": 0.944, "acc": 0.854}
    for bad, text in (({"metrics": {"auc": 94.4}}, "fractions in [0, 1]"),
                      ({"metrics": {"kappa": 0.5}}, "references[0].metrics.kappa"),
                      ({"citation": None}, "references[0].citation"),
                      ({"colour": "red"}, "`references[0].colour`: unknown key")):
        with pytest.raises(ConfigError, match=text.replace("[", r"\[").replace("]", r"\]")):
            validate_config({**tiny_config, "references": [{**ROW, **bad}]})
    # a file of rows, relative to the config file
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "r.yaml").write_text(yaml.safe_dump({"references": [ROW, ROW]}))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tiny_config, "references": ["refs/r.yaml", ROW]}))
    assert len(load_config(path).references) == 3
    path.write_text(yaml.safe_dump({**tiny_config, "references": ["refs/missing.yaml"]}))
    with pytest.raises(ConfigError, match=r"`references\[0\]`: file 'refs/missing.yaml' not found"):
        load_config(path)


def test_shipped_medmnist_references_cover_known_datasets_and_the_issue_figure() -> None:
    cfg = load_config(CONFIGS / "medmnist-real3.yaml")
    refs = cfg.references
    assert refs and {r.dataset for r in refs} <= set(INFO)
    pneu = {r.model: r.metrics for r in refs if r.dataset == "pneumoniamnist" and r.size == 28}
    assert pneu["ResNet-18 (28)"] == {"auc": 0.944, "acc": 0.854}  # MedMNIST v2, Table 3
    assert all(r.citation.startswith("MedMNIST v2") and "Table 3" in r.citation for r in refs)


def test_the_full_budget_grid(tiny_config) -> None:
    """configs/medmnist-real3.yaml: the three real files, 28 px, all training images, 5 seeds,
    tuned 20 trials each, every dataset pre-trained on real images that are not its own."""
    cfg = load_config(CONFIGS / "medmnist-real3.yaml")
    assert [(d.name, d.size, d.root, d.options) for d in cfg.datasets] == [
        (n, 28, "../shared/data", {}) for n in ("pneumoniamnist", "breastmnist", "retinamnist")]
    assert cfg.seeds == [0, 1, 2, 3, 4] and cfg.tune.enabled and cfg.tune.n_trials == 20
    assert cfg.tune.pruner != "none" and cfg.model.weights == "pretrain"
    for d in cfg.datasets:
        assert cfg.pretrain_for(d).dataset != d.name
        assert cfg.pretrain_for(d).root == "../shared/data"
    from metalr_bench.strategies.core.registry import available_strategies

    assert {s.name for s in cfg.strategies} == set(available_strategies())


def test_a_dataset_pretrains_on_its_own_source(tiny_config) -> None:
    """A dataset entry's `pretrain` replaces `model.pretrain` for it alone: its runs start from
    that source's checkpoint; an entry without one keeps its cell identity."""
    base = {**tiny_config, "seeds": [0], "epochs": 1, "strategies": ["full"],
            "model": {"arch": "smallcnn", "weights": "pretrain",
                      "pretrain": {"epochs": 1, "batch_size": 16}}}
    plain = {"adapter": "synthetic", "size": 16, "options": {"n_patients": 24}}
    own = {**plain, "label": "own", "pretrain": {"epochs": 1, "batch_size": 16, "lr": 2e-3}}
    before = validate_config({**base, "datasets": [plain]})
    cfg = validate_config({**base, "datasets": [plain, own]})
    assert cfg.config_hash(cfg.cells()[0]) == before.config_hash(before.cells()[0])
    assert "pretrain" not in cfg.cell_identity(cfg.cells()[0])["dataset"]
    assert cfg.cell_identity(cfg.cells()[1])["dataset"]["pretrain"]["lr"] == 2e-3
    outcome = run_benchmark(cfg, progress=False)
    client = MlflowClient(cfg.tracking_uri)
    sources = {client.get_run(r.run_id).data.tags["dataset"]:
               client.get_run(r.run_id).data.params["weights_source"] for r in outcome.results}
    assert set(sources) == {"synthetic", "own"} and sources["synthetic"] != sources["own"]
    assert all(s.startswith("pretrain:pretrain-smallcnn-synthetic-source-16px-")
               for s in sources.values())
    with pytest.raises(ConfigError, match=r"own.*`model.weights: pretrain`"):
        validate_config({**base, "model": {"arch": "smallcnn", "weights": "none"},
                         "datasets": [own]})


def test_references_reach_the_report_through_mlflow(tiny_config) -> None:
    """The runner logs the rows to the parent run (`references.json`); the report reads them
    back, keeps those of the grid's datasets and sizes, and shows them unranked."""
    other = {**ROW, "dataset": "breastmnist", "size": 28}
    at_64 = {**ROW, "size": 64}
    cfg = validate_config({**tiny_config, "seeds": [0, 1], "epochs": 1,
                           "references": [ROW, other, at_64]})
    run_benchmark(cfg, progress=False)
    runs = res.load_runs(cfg.tracking_uri, cfg.name)
    refs = references.load_references(cfg.tracking_uri, runs)
    assert len(refs) == 3 and refs.loc[0, "metrics"] == {"auc": 0.944, "acc": 0.854}
    results = res.results_table(runs)
    matched = references.matching(refs, results)
    assert matched["key"].tolist() == ["synthetic@16"] and matched["size"].tolist() == [16]
    board = leaderboard(results, ["test_auc", "test_acc"], "test_auc")
    soup = BeautifulSoup(references.leaderboard_with_published_html(
        board, matched, ["test_auc", "test_acc"], "test_auc"), "html.parser")
    rows = [[td.get_text(" ", strip=True) for td in tr.select("td")]
            for tr in soup.select("table#leaderboard-published tbody tr")]
    assert [r[1] for r in rows] == ["full", "last_k", "ResNet-18 (28) published"] or \
        [r[1] for r in rows] == ["last_k", "full", "ResNet-18 (28) published"]
    assert rows[-1][4:] == ["0.944", "0.854", "published"]
    assert rows[0][-1] == "1"
    note = references.protocol_note(matched, results)
    assert "4708 training images" in note[1] and "random initialisation" in note[1]


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def test_cost_table_shows_trainable_parameters_next_to_time_and_memory() -> None:
    rows = [{"dataset_key": "d@28", "strategy_label": s, "seed": k,
             "param.n_trainable_params": str(p), "mean_epoch_time_s": t + k,
             "peak_memory_mb": 100.0 + k}
            for s, p, t in (("full", 11_000_000, 2.0), ("last_k", 500_000, 1.0)) for k in (0, 1)]
    table = cost.cost_table(_frame(rows))
    assert list(table.columns) == ["dataset", "strategy", "trainable parameters",
                                   "wall time per epoch (s)", "peak memory (MiB)"]
    assert table.set_index("strategy")["trainable parameters"].to_dict() == {
        "full": 11_000_000, "last_k": 500_000}
    assert table.set_index("strategy")["wall time per epoch (s)"].to_dict() == {
        "full": 2.5, "last_k": 1.5}
    old = _frame([{k: v for k, v in r.items() if k != "param.n_trainable_params"} for r in rows])
    assert "trainable parameters" not in cost.cost_table(old)  # older runs: no such param
    assert math.isclose(cost.cost_table(old)["peak memory (MiB)"].iloc[0], 100.5)


@pytest.mark.parametrize("dataset", ["breastmnist", "retinamnist", "pneumoniamnist"])
def test_the_per_dataset_real3_configs_are_the_grid_restricted_to_one_dataset(dataset) -> None:
    """configs/medmnist-real3-<dataset>.yaml (how BENCHMARKS ran the grid, a dataset at a
    time) are medmnist-real3.yaml with that dataset's entry only: the same cells."""
    whole = yaml.safe_load((CONFIGS / "medmnist-real3.yaml").read_text())
    part = yaml.safe_load((CONFIGS / f"medmnist-real3-{dataset}.yaml").read_text())
    (entry,) = [d for d in whole["datasets"] if d["adapter"] == dataset]
    assert part == {**whole, "datasets": [entry]}


def test_a_row_names_its_network_and_the_report_says_whether_ours_is_it() -> None:
    """MedMNIST's "ResNet-18 (28)" is its 28-px ResNet (resnet18_cifar), not torchvision's."""
    rows = load_config(CONFIGS / "medmnist-v2-recipe.yaml").references
    by_model = {(r.dataset, r.model): r.arch for r in rows}
    assert by_model[("breastmnist", "ResNet-18 (28)")] == "resnet18_cifar"
    assert by_model[("retinamnist", "ResNet-50 (224)")] == "resnet50"
    refs = pd.DataFrame([{**ROW, "dataset": "breastmnist", "size": 28, "arch": "resnet18_cifar"},
                         {**ROW, "dataset": "breastmnist", "size": 28, "model": "x",
                          "arch": None}], columns=references.COLUMNS)
    for ours, note in (("resnet18_cifar", " (same network: <code>resnet18_cifar</code>)"),
                       ("resnet18", " (another network: this row's <code>resnet18_cifar</code>,"
                                    " ours <code>resnet18</code>)")):
        results = _frame([{"dataset_key": "breastmnist@28", "dataset": "breastmnist",
                           "image_size": 28, "model": ours}])
        matched = references.matching(refs, results)
        assert matched["ours"].tolist() == [ours, ours]
        assert references._network_note(matched.iloc[0]) == note
        assert references._network_note(matched.iloc[1]) == ""  # a row naming no network
