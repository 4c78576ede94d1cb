"""Config validation: every bad value names its field and what is allowed."""

from __future__ import annotations

import pytest
from metalr_bench.benchmark.cli import main
from metalr_bench.benchmark.config import ConfigError, load_config, validate_config


def test_defaults_are_the_quick_benchmark() -> None:
    cfg = validate_config({})
    assert cfg.name == "quick"
    assert [d.name for d in cfg.datasets] == ["synthetic"]
    assert {"full", "last_k", "l2sp", "layer_decay"} <= {s.name for s in cfg.strategies}
    assert cfg.seeds == [0, 1, 2]
    assert cfg.tracking_uri == "sqlite:///mlflow.db"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"epochz": 3}, "`epochz`: unknown key"),
        ({"epochs": 0}, "`epochs`: Input should be greater than or equal to 1"),
        ({"lr": -0.1}, "`lr`: Input should be greater than 0"),
        ({"optimizer": "rmsprop"}, "`optimizer`: unknown optimizer 'rmsprop'; choose one of adam, adamw, sgd"),
        ({"strategies": ["fancy"]}, "unknown strategy 'fancy'; available:"),
        ({"datasets": ["imagenet"]}, "unknown dataset 'imagenet'; available:"),
        ({"strategies": [{"name": "last_k", "params": {"k": 0}}]},
         "params of strategy 'last_k': `k`: Input should be greater than or equal to 1"),
        ({"strategies": [{"name": "l2sp", "params": {"gamma": 1}}]},
         "params of strategy 'l2sp': `gamma`: unknown key"),
        ({"model": {"arch": "vgg"}}, "`model.arch`: unknown model 'vgg'; choose one of smallcnn"),
        ({"model": {"weights": "hub://x"}}, "expected none, imagenet, pretrain or a path"),
        ({"seeds": [1, 1]}, "seeds must be distinct"),
        ({"device": "gpu"}, "expected auto, cpu, cuda or cuda:N"),
        ({"datasets": [{"adapter": "synthetic", "options": {"n_patients": 2}}]},
         "options of dataset 'synthetic': `n_patients`: Input should be greater than or equal"),
    ],
)
def test_bad_values_name_the_field(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert expected in str(info.value)


def test_unknown_top_level_key_lists_allowed_keys() -> None:
    with pytest.raises(ConfigError, match="Allowed top-level keys: name, datasets, strategies"):
        validate_config({"epochz": 1})


def test_list_params_expand_to_grid_cells() -> None:
    cfg = validate_config({
        "strategies": ["full", {"name": "last_k", "params": {"k": [1, 2, 3]}}],
        "seeds": [0, 1],
    })
    cells = cfg.cells()
    assert len(cells) == (1 + 3) * 2
    assert sorted({c.strategy_label for c in cells}) == ["full", "last_k(k=1)", "last_k(k=2)",
                                               "last_k(k=3)"]


def test_config_hash_changes_with_what_changes_results() -> None:
    cfg = validate_config({"strategies": [{"name": "last_k", "params": {"k": [1, 2]}}],
                           "seeds": [0, 1]})
    hashes = {cfg.config_hash(c) for c in cfg.cells()}
    assert len(hashes) == 4
    same = validate_config({"strategies": [{"name": "last_k", "params": {"k": [1, 2]}}],
                            "seeds": [0, 1], "tracking_uri": "sqlite:///other.db"})
    assert {same.config_hash(c) for c in same.cells()} == hashes  # where it is logged: no change
    # an explicit default equals the implicit one
    a = validate_config({"strategies": ["last_k"]})
    b = validate_config({"strategies": [{"name": "last_k", "params": {"k": 2}}]})
    assert a.config_hash(a.cells()[0]) == b.config_hash(b.cells()[0])
    lr = validate_config({"strategies": ["last_k"], "lr": 0.01})
    assert lr.config_hash(lr.cells()[0]) != a.config_hash(a.cells()[0])


def test_yaml_file_and_cli_override(tmp_path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("name: mine\nepochs: 7\nstrategies: [full, l2sp]\nseeds: [3]\n")
    cfg = load_config(path, {"epochs": 2})
    assert (cfg.name, cfg.epochs, cfg.seeds) == ("mine", 2, [3])
    assert [s.name for s in cfg.strategies] == ["full", "l2sp"]


def test_bad_yaml_and_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(lst)


def test_cli_reports_config_errors_with_exit_code_2(capsys) -> None:
    assert main(["--strategy", "nope", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown strategy 'nope'" in err and "available:" in err


# -- the dataset entry's adapter field (issue 40: `name` held the adapter) ---------------------------
_ADAPTER_CFG = {"strategies": ["full"], "seeds": [0], "epochs": 1}


def _identity_hash(cfg) -> str:
    from metalr_bench.benchmark.config import stable_hash

    ident = cfg.cell_identity(cfg.cells()[0])
    ident.pop("code_fingerprint"), ident.pop("code_version")  # these move with every code change
    return stable_hash(ident)[:16]


def test_dataset_name_key_still_loads_and_warns_once() -> None:
    import warnings

    from metalr_bench.datasets.core.errors import DatasetWarning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cfg = validate_config({**_ADAPTER_CFG, "datasets": [{"name": "synthetic", "size": 16}]})
    lines = [str(w.message) for w in seen if issubclass(w.category, DatasetWarning)]
    assert len(lines) == 1 and "`adapter: synthetic`" in lines[0], lines
    assert cfg.datasets[0].adapter == "synthetic"


def test_dataset_adapter_key_loads_silently() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = validate_config({**_ADAPTER_CFG, "datasets": [{"adapter": "synthetic"}, "synthetic"]})
    assert [d.adapter for d in cfg.datasets] == ["synthetic", "synthetic"]
    with pytest.raises(ConfigError, match="adapter.*once"):
        validate_config({**_ADAPTER_CFG, "datasets": [{"adapter": "synthetic",
                                                       "name": "synthetic"}]})


def test_adapter_rename_keeps_every_cell_hash() -> None:
    """The identity hash of a config written with `name:` equals the one with `adapter:` and
    the one main computed before the rename (commit 0d4c25b, code fields left out: they move
    with any code change)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = validate_config({**_ADAPTER_CFG, "datasets": [{"name": "synthetic"}]})
    new = validate_config({**_ADAPTER_CFG, "datasets": [{"adapter": "synthetic"}]})
    assert _identity_hash(old) == _identity_hash(new) == "c8e8a1768d91071c"
    cell_old, cell_new = old.cells()[0], new.cells()[0]
    assert old.config_hash(cell_old) == new.config_hash(cell_new)
    assert old.cell_params(cell_old) == new.cell_params(cell_new)
    assert new.cell_params(cell_new)["dataset.adapter"] == "synthetic"
    assert new.datasets[0].model_dump()["name"] == "synthetic"  # dumps keep the old key
