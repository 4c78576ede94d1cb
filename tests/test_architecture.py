"""The architecture's promises: one cell identity, a strategy is one file, packages say what
they hold and may import."""

from __future__ import annotations

import importlib
import pkgutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from metalr_bench.benchmark.cli import main
from metalr_bench.benchmark.config import RESULT_FIELDS, BenchmarkConfig, Cell, validate_config
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.benchmark.tuning.space import search_space
from metalr_bench.benchmark.tuning.studies import study_name
from metalr_bench.strategies.core import base as strategy_base
from metalr_bench.strategies.core import registry
from mlflow import MlflowClient


# -- one definition of a cell's identity ------------------------------------------------------------
def _identities(cfg: BenchmarkConfig, cell: Cell) -> tuple[str, str, dict[str, Any]]:
    """(config_hash, study name, logged params) of ``cell``; the study searches only ``alpha``."""
    space = search_space(cell.strategy, 5, {"l2sp": {"lr": None}})
    fixed = {k: v for k, v in cell.params.items() if k not in space}
    name = study_name(cfg, cell.dataset, cell.strategy, fixed, space)
    return cfg.config_hash(cell), name, cfg.cell_params(cell)


#: a changed value for every result-relevant config field (RESULT_FIELDS), checked complete below
CHANGED = {"epochs": 7, "batch_size": 8, "lr": 0.05, "optimizer": "sgd", "weight_decay": 0.0,
           "momentum": 0.5, "augment": False, "input_pipeline": "metalr_public",
           "precise_bn": False, "selection_metric": "acc"}


def test_every_result_field_changes_hash_study_and_params() -> None:
    """Toggling `precise_bn` once continued the old Optuna study (the study name left it out)
    and `momentum`, `augment`, `precise_bn` were not logged: all three now derive from
    `cell_identity`, and each field in turn must change all three."""
    assert set(CHANGED) == set(RESULT_FIELDS)
    base = validate_config({"strategies": [{"name": "l2sp", "params": {"beta": 0.02}}],
                            "seeds": [0]})
    (cell,) = base.cells()
    ref = _identities(base, cell)
    variants: dict[str, tuple[BenchmarkConfig, Cell]] = {
        f: (base.model_copy(update={f: v}), cell) for f, v in CHANGED.items()
    }
    variants |= {
        "dataset.size": (base, Cell(cell.dataset.model_copy(update={"size": 32}), "l2sp",
                                    cell.params, 0)),
        "dataset.options": (base, Cell(cell.dataset.model_copy(
            update={"options": {"n_patients": 50}}), "l2sp", cell.params, 0)),
        "model.arch": (base.model_copy(update={"model": base.model.model_copy(
            update={"arch": "smallcnn"})}), cell),
        "model.weights": (base.model_copy(update={"model": base.model.model_copy(
            update={"weights": "none"})}), cell),
        "strategy param": (base, Cell(cell.dataset, "l2sp", {"beta": 0.5}, 0)),
    }
    for what, (cfg, c) in variants.items():
        h, name, params = _identities(cfg, c)
        assert h != ref[0], f"{what} does not change config_hash"
        assert name != ref[1], f"{what} does not change the study name"
        assert params != ref[2], f"{what} does not change the logged params"
    # the cell's seed is the run's, not the study's (trials use tune.seed): only hash and params
    other_seed = Cell(cell.dataset, "l2sp", cell.params, 1)
    h, name, params = _identities(base, other_seed)
    assert h != ref[0] and params != ref[2] and name == ref[1]
    tune_seed = base.model_copy(update={"tune": base.tune.model_copy(update={"seed": 3})})
    assert _identities(tune_seed, cell)[1] != ref[1]
    # a searched name is not part of the study's identity: every trial sets it
    tuned = base.model_copy(update={"lr": 0.5})
    space = search_space("l2sp", 5)  # lr searched
    assert study_name(tuned, cell.dataset, "l2sp", {"beta": 0.02}, space) == study_name(
        base, cell.dataset, "l2sp", {"beta": 0.02}, space)


# -- a strategy is one file -------------------------------------------------------------------------
SHRINK = '''
    """Shrink: the backbone at lr * factor, the head at lr (a user's own strategy)."""

    from metalr_bench.strategies import Strategy, register
    from metalr_bench.strategies.core.space import LR, SearchDim
    from pydantic import BaseModel, ConfigDict, Field


    class ShrinkParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        factor: float = Field(0.5, gt=0, le=1, description="backbone LR multiplier")


    @register
    class Shrink(Strategy):
        """Backbone at lr * factor, head at lr."""

        name = "shrink"
        Params = ShrinkParams
        test_params = [{"factor": 0.25}]
        search_space = {"lr": LR, "factor": SearchDim("float", 0.1, 1.0)}

        def param_groups(self):
            head = len(self.groups) - 1
            return [self._group(i, lr=self.settings.lr * (1 if i == head else self.params.factor))
                    for i in range(len(self.groups))]
'''


@pytest.fixture
def user_strategy_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An installed-looking package ``mystrats`` whose entry point adds the ``shrink`` strategy."""
    site = tmp_path / "site"
    (site / "mystrats").mkdir(parents=True)
    (site / "mystrats" / "__init__.py").write_text("")
    (site / "mystrats" / "shrink.py").write_text(textwrap.dedent(SHRINK))
    dist = site / "mystrats-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mystrats\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\nshrink = mystrats.shrink\n")
    monkeypatch.syspath_prepend(str(site))
    assert "shrink" not in registry.available_strategies()
    registry.discover(refresh=True)
    yield
    strategy_base.STRATEGIES.pop("shrink", None)


def test_a_strategy_in_one_file_runs_everywhere(user_strategy_package, tiny_config, tmp_path,
                                               capsys) -> None:
    """Config, `run-benchmark list`, the tuning space, `plan` and one cell: no other file
    names the new strategy."""
    assert "shrink" in registry.available_strategies()
    assert "shrink" not in registry.default_strategies()  # opt-in, no default_rank
    tiny_config |= {"strategies": [{"name": "shrink", "params": {"factor": 0.25}}], "seeds": [0],
                    "epochs": 1}
    cfg = validate_config(tiny_config)
    with pytest.raises(ValueError, match="factor"):
        validate_config(tiny_config | {"strategies": [{"name": "shrink",
                                                       "params": {"factor": 2}}]})

    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "shrink" in listed and "Backbone at lr * factor" in listed

    space = search_space("shrink", 5)
    assert set(space) == {"lr", "factor"} and space["factor"].high == 1.0

    path = tmp_path / "shrink.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["plan", "--config", str(path), "--seconds-per-iter", "0.01"]) == 0
    assert "shrink" in capsys.readouterr().out

    outcome = run_benchmark(cfg, progress=False)
    (result,) = outcome.results
    assert result.status == "FINISHED", result.error
    run = MlflowClient(cfg.tracking_uri).get_run(result.run_id)
    assert run.data.params["strategy.factor"] == "0.25"
    lrs = {k: v for k, v in run.data.metrics.items() if k.startswith("lr/")}
    assert lrs["lr/head"] == pytest.approx(cfg.lr)
    assert lrs["lr/stem"] == pytest.approx(cfg.lr * 0.25)


def test_strategy_names_are_not_listed_outside_their_modules() -> None:
    """The registry finds strategies by scanning the package; the old hard-coded name lists
    (registry, tuning space, bench_throughput) must not come back."""
    root = Path(__file__).resolve().parents[1]
    names = [f'"{n}"' for n in registry.available_strategies()]
    offenders = []
    for folder in ("benchmark", "strategies/core", "datasets", "reports"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            listed = [n for n in names if n in text]
            if len(listed) >= 3:
                offenders.append(f"{path.relative_to(root)}: {listed}")
    assert not offenders, offenders


# -- packages say what they hold and may import ------------------------------------------------------
def test_every_package_docstring_says_what_it_holds_and_may_import() -> None:
    for top in ("benchmark", "strategies", "datasets", "reports"):
        pkg = importlib.import_module(f"metalr_bench.{top}")
        packages = [pkg] + [importlib.import_module(m.name)
                            for m in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}.")
                            if m.ispkg]
        for p in packages:
            doc = p.__doc__ or ""
            assert "Holds" in doc and "May import" in doc, f"{p.__name__}: {doc[:80]!r}"


# -- a strategy's module docstring is a screen; its full notes live in docs/strategies.md ---------
def test_strategy_docstrings_fit_a_screen_and_docs_hold_the_full_notes() -> None:
    """Each strategy module keeps its formula, defaults and a one-line deviations note (at most
    30 lines); docs/strategies.md has a section for every strategy module."""
    import metalr_bench.strategies as strategies_pkg

    root = Path(strategies_pkg.__file__).parent
    docs = (Path(__file__).resolve().parents[1] / "docs" / "strategies.md").read_text()
    for mod in pkgutil.iter_modules([str(root)]):
        if mod.ispkg:
            continue
        doc = importlib.import_module(f"metalr_bench.strategies.{mod.name}").__doc__ or ""
        assert len(doc.strip().splitlines()) <= 30, f"{mod.name}: {len(doc.splitlines())} lines"
        assert f"\n## {mod.name}\n" in docs, f"docs/strategies.md has no section {mod.name}"


# -- a regular (non-editable) install ships every package ---------------------------------------
def test_pyproject_lists_every_package_folder() -> None:
    """setuptools installs only the packages pyproject.toml lists (``[tool.setuptools]
    packages``); an editable install finds the others anyway, so a new sub-package (the
    ``config`` package of issue 40's split) would work here and be missing from a wheel."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {
        "metalr_bench." + ".".join(init.parent.relative_to(root).parts)
        for top in ("benchmark", "strategies", "datasets", "reports")
        for init in (root / top).rglob("__init__.py")
    }
    assert found - listed == set(), sorted(found - listed)


# -- one word per idea: params (a strategy's), options (a dataset adapter's), settings (a run's),
#    target (a dataset) --
_PACKAGES = ("benchmark", "strategies", "datasets", "reports")


def _identifiers(path: Path) -> list[tuple[int, str]]:
    """Every name a module defines or uses: variables, arguments, attributes, keywords, defs,
    imports. ``Thread(target=...)`` (the standard library's keyword) is left out."""
    import ast

    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.arg):
            out.append((node.lineno, node.arg))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.append((node.lineno, node.name))
        elif isinstance(node, ast.alias):
            out.append((node.lineno, node.asname or node.name))
        elif isinstance(node, ast.Call):
            is_thread = getattr(node.func, "attr", getattr(node.func, "id", "")) == "Thread"
            out += [(node.lineno, k.arg) for k in node.keywords
                    if k.arg and not (is_thread and k.arg == "target")]
    return out


def test_a_dataset_adapters_settings_are_called_options() -> None:
    """Issue 40: a dataset adapter's settings model is ``options`` (``register_dataset(name,
    options=...)``, ``DatasetEntry.options``), like the config key ``options:``; a strategy's
    are its ``Params``. ``options_model`` survives only as the deprecated keyword of
    ``register_dataset``."""
    import ast
    import dataclasses

    from metalr_bench.datasets.core import registry as dataset_registry

    root = Path(__file__).resolve().parents[1]
    shim = root / "datasets" / "core" / "registry.py"
    fn = next(n for n in ast.walk(ast.parse(shim.read_text()))
              if isinstance(n, ast.FunctionDef) and n.name == "register_dataset")
    offenders = [
        f"{path.relative_to(root)}:{i}: {line.strip()}"
        for top in _PACKAGES for path in (root / top).rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "options_model" in line and not (path == shim and fn.lineno <= i <= (fn.end_lineno or 0))
    ]
    assert not offenders, "\n".join(offenders)
    assert [f.name for f in dataclasses.fields(dataset_registry.DatasetEntry)][:3] == \
        ["name", "loader", "options"]


def test_a_tuning_unit_is_a_spec_and_target_is_the_dataset() -> None:
    """Issue 40: "target" meant both a tuning unit and the dataset being fine-tuned. A tuning
    unit is now a *spec* (``StudySpec``, ``RaceSpec``, held as ``spec``); no name in the
    benchmark package says "target" except the target dataset's (``target_size``)."""
    import dataclasses
    import inspect

    from metalr_bench.benchmark.tuning import race_study, studies

    root = Path(__file__).resolve().parents[1]
    offenders = [f"{path.relative_to(root)}:{lineno}: {name}"
                 for path in (root / "benchmark").rglob("*.py")
                 for lineno, name in _identifiers(path)
                 if "target" in name.lower() and name != "target_size"]
    assert not offenders, "\n".join(offenders)
    for module, gone in ((studies, "StudyTarget"), (race_study, "RaceTarget")):
        assert not hasattr(module, gone), f"{module.__name__}.{gone} is back"
    assert dataclasses.is_dataclass(studies.StudySpec) and dataclasses.is_dataclass(
        race_study.RaceSpec)
    assert "spec" in {f.name for f in dataclasses.fields(studies.StudyOutcome)}
    assert "spec" in inspect.signature(studies.study_worker).parameters
    assert "spec" in inspect.signature(studies.StudyRunner).parameters


def test_a_runs_knobs_are_called_settings() -> None:
    """Issue 40: "options" is a dataset adapter's word only. A run's knobs are *settings*, as
    in ``TrainSettings`` (what a strategy is told), ``RaceSettings`` and ``OptimizerSettings``:
    the trainer's are ``TrainerSettings`` (``Trainer(..., settings=...)``, built by
    ``trainer_settings``; ``build_parts(..., trainer_settings=...)``, whose ``settings`` are the
    strategy's), a tuning worker's are ``worker_settings``."""
    import inspect

    from metalr_bench.benchmark.training import cell, trainer
    from metalr_bench.benchmark.tuning import studies

    root = Path(__file__).resolve().parents[1]
    gone = ("TrainerOptions", "trainer_options", "worker_options")
    offenders = [f"{path.relative_to(root)}:{lineno}: {name}"
                 for top in (*_PACKAGES, "tests") for path in (root / top).rglob("*.py")
                 for lineno, name in _identifiers(path)
                 if any(g in name for g in gone)]
    assert not offenders, "\n".join(offenders)
    assert not hasattr(trainer, "TrainerOptions") and not hasattr(cell, "trainer_options")
    assert "settings" in inspect.signature(trainer.Trainer).parameters
    assert "trainer_settings" in inspect.signature(cell.build_parts).parameters
    assert "worker_settings" in inspect.signature(studies.study_worker).parameters
    for fn in (trainer.Trainer, cell.build_parts, studies.study_worker):
        assert "options" not in inspect.signature(fn).parameters, fn


def test_register_dataset_still_takes_options_model_with_a_deprecation_warning() -> None:
    """``options_model=`` (the keyword before issue 40) still registers the adapter for one
    release, and the warning names the new keyword."""
    from metalr_bench.datasets.core.registry import DATASETS, load_dataset, register_dataset
    from pydantic import BaseModel, ConfigDict

    class OldOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int = 3

    seen: dict[str, Any] = {}
    try:
        with pytest.warns(DeprecationWarning, match=r"options_model=.*deprecated.*options="):
            @register_dataset("old-keyword-test", options_model=OldOptions)
            def _load(**kwargs: Any) -> Any:
                seen.update(kwargs)
                return "bundle"

        assert DATASETS["old-keyword-test"].options is OldOptions
        assert load_dataset("old-keyword-test", options={"n": 5}) == "bundle"
        assert seen["n"] == 5
        with pytest.raises(ValueError, match="n"):  # the model still validates
            load_dataset("old-keyword-test", options={"m": 1})
        with pytest.raises(TypeError, match="options"):  # not both
            register_dataset("old-keyword-test-2", options=OldOptions, options_model=OldOptions)
    finally:
        DATASETS.pop("old-keyword-test", None)
        DATASETS.pop("old-keyword-test-2", None)
