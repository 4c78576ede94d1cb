"""Bad input: one clear message (input, problem, fix), exit code 2, no MLflow run left behind;
and the config loader never raises anything but ConfigError (hypothesis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from metalr_bench.benchmark.cli import main
from metalr_bench.benchmark.config import BenchmarkConfig, ConfigError, load_config
from metalr_bench.benchmark.models.zoo import SmallCNN
from metalr_bench.datasets.core.registry import DATASETS, available_datasets, register_dataset
from mlflow import MlflowClient


def _write(tmp_path: Path, data: dict[str, Any] | str) -> str:
    path = tmp_path / "bench.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def broken_dataset():
    """An adapter whose file is missing, as a file-based loader reports it."""

    @register_dataset("missing-file-test")
    def _load(root, **_: Any):
        raise FileNotFoundError(
            f"{root}/missing.npz not found; pass `--data-root` with the folder holding it or "
            "`--download`")

    yield "missing-file-test"
    DATASETS.pop("missing-file-test", None)


def _file(tmp_path: Path, name: str, content: bytes | None = None, obj: Any = None) -> str:
    path = tmp_path / name
    if obj is not None:
        torch.save(obj, path)
    else:
        path.write_bytes(content or b"")
    return str(path)


def _pretrain(source: dict[str, Any]) -> dict[str, Any]:
    return {"model": {"arch": "smallcnn", "weights": "pretrain",
                      "pretrain": {"epochs": 1, **source}}}


NO_CUDA = not torch.cuda.is_available()


def _smallcnn_checkpoint(tmp_path: Path) -> str:
    path = tmp_path / "small.pt"
    torch.save(SmallCNN(1, 2).state_dict(), path)
    return str(path)


# (id, how to build argv from (config_path_writer, tmp_path), expected substrings in stderr)
CASES = [
    ("unknown-strategy", lambda c, t: ["--strategy", "nope"],
     ["unknown strategy 'nope'", "available: ", "full"]),
    ("unknown-dataset", lambda c, t: ["--dataset", "nopemnist"],
     ["unknown dataset 'nopemnist'", "available: ", "synthetic"]),
    ("negative-lr", lambda c, t: ["--lr", "-0.1"],
     ["`lr`", "greater than 0", "(got -0.1)", "Fix the value"]),
    ("k-too-large", lambda c, t: ["--config", c({"strategies": [
        {"name": "last_k", "params": {"k": 9}}]})],
     ["last_k(k=9)", "k=9 is larger than the model's 5 layer groups", "use 1 <= k <= 5"]),
    ("checkpoint-wrong-model", lambda c, t: ["--model", "resnet18", "--weights",
                                             _smallcnn_checkpoint(t)],
     ["small.pt does not match model 'resnet18'", "missing keys", "Use a checkpoint saved from"]),
    ("checkpoint-missing", lambda c, t: ["--weights", str(t / "nothere.pt")],
     ["nothere.pt does not exist", "pass an existing .pt file"]),
    ("tracking-unreachable", lambda c, t: ["--tracking-uri", "http://127.0.0.1:9"],
     ["tracking server http://127.0.0.1:9 is not reachable", "mlflow server --host 127.0.0.1 "
      "--port 9", "sqlite:///mlflow.db"]),
    ("tracking-folder-missing", lambda c, t: ["--tracking-uri", f"sqlite:///{t}/no/dir/m.db"],
     ["folder", "no/dir does not exist", "mkdir -p"]),
    ("dataset-file-missing", lambda c, t: ["--dataset", "missing-file-test", "--data-root",
                                           str(t)],
     ["dataset 'missing-file-test'", "missing.npz not found", "--data-root"]),
    ("config-not-yaml", lambda c, t: ["--config", c("name: [unclosed")],
     ["bench.yaml is not valid YAML"]),
    ("config-missing", lambda c, t: ["--config", str(t / "none.yaml")],
     ["none.yaml does not exist"]),
    ("config-unknown-key", lambda c, t: ["--config", c({"epochz": 3})],
     ["`epochz`: unknown key", "Allowed top-level keys:"]),
    ("seed-not-int", lambda c, t: ["--config", c({"seeds": ["a"]})],
     ["`seeds[0]`", "valid integer"]),
    # the pre-training source is loaded by the pre-flight too (it used to pass it and then fail
    # every cell, one after the other, leaving a FAILED run per cell)
    ("pretrain-source-file-missing", lambda c, t: ["--config", c(_pretrain(
        {"dataset": "missing-file-test", "root": str(t)}))],
     ["`model.pretrain`", "pretrain source 'missing-file-test'", "missing.npz not found",
      "--data-root"]),
    ("pretrain-imagefolder-missing", lambda c, t: ["--config", c(_pretrain(
        {"dataset": "imagefolder", "root": str(t / "no-images")}))],
     ["`model.pretrain`", "pretrain source 'imagefolder'", "no-images"]),
    ("pretrain-unknown-dataset", lambda c, t: ["--config", c(_pretrain({"dataset": "nope"}))],
     ["model.pretrain", "unknown dataset 'nope'"]),
    ("checkpoint-corrupt", lambda c, t: ["--weights", _file(t, "junk.pt", b"not a torch file")],
     ["`model.weights`", "junk.pt could not be read as a PyTorch file"]),
    ("checkpoint-not-a-state-dict", lambda c, t: ["--weights", _file(t, "list.pt", obj=[1, 2])],
     ["`model.weights`", "list.pt holds list, expected a state dict"]),
    ("strategy-param-wrong-type", lambda c, t: ["--config", c({"strategies": [
        {"name": "last_k", "params": {"k": "two"}}]})],
     ["params of strategy 'last_k'", "`k`", "valid integer"]),
    ("strategy-param-unknown", lambda c, t: ["--config", c({"strategies": [
        {"name": "last_k", "params": {"kk": 2}}]})],
     ["params of strategy 'last_k'", "`kk`"]),
    ("tracking-not-sqlite", lambda c, t: ["--tracking-uri", "sqlite:///" + _file(
        t, "notes.db", b"these are my notes, not a database")],
     ["notes.db is not an SQLite database", "--tracking-uri"]),
    ("epochs-zero", lambda c, t: ["--epochs", "0"],
     ["`epochs`", "greater than or equal to 1", "(got 0)"]),
    pytest.param("cuda-absent", lambda c, t: ["--device", "cuda"],
                 ["device='cuda' but no CUDA GPU is visible", "--device cpu"],
                 marks=pytest.mark.skipif(not NO_CUDA, reason="a CUDA GPU is visible")),
]


def _case_id(case: Any) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def test_at_least_15_bad_inputs():
    assert len(CASES) >= 15


@pytest.mark.parametrize("name, make_argv, expected",
                         [c if hasattr(c, "values") else pytest.param(*c) for c in CASES],
                         ids=[_case_id(c) for c in CASES])
def test_bad_input_gives_one_clear_message(name, make_argv, expected, tiny_config, tmp_path,
                                           capsys, broken_dataset):
    base = {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1}

    def config_file(extra: dict[str, Any] | str) -> str:
        return _write(tmp_path, extra if isinstance(extra, str) else {**base, **extra})

    argv = make_argv(config_file, tmp_path)
    if "--config" not in argv:
        argv = ["--config", config_file({}), *argv]
    rc = main([*argv, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("run-benchmark: error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert err.count("run-benchmark: error: ") == 1, err  # one message
    client = MlflowClient(tracking_uri=tiny_config["tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r for r in runs if r.info.status == "RUNNING"] == []  # none left RUNNING
    assert runs == []  # nor any other: the pre-flight stops the run before the first one


@pytest.mark.skipif("pneumoniamnist" not in available_datasets(),
                    reason="the MedMNIST adapter is not in this build")
def test_missing_medmnist_file(tiny_config, tmp_path, capsys):
    path = _write(tmp_path, {**tiny_config, "seeds": [0], "strategies": ["full"]})
    rc = main(["--config", path, "--dataset", "pneumoniamnist", "--data-root",
               str(tmp_path / "empty"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "pneumoniamnist" in err and err.startswith("run-benchmark: error: ")


# -- fuzzing the config loader -----------------------------------------------------------------
KEYS = sorted({*BenchmarkConfig.model_fields, "name", "params", "size", "options", "root",
               "arch", "weights", "pretrain", "k", "n_patients", "download", "views",
               "allow_md5_mismatch", "dataset", "epochs", "lr", "alpha", "decay"})
LEAVES = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
          | st.sampled_from(["full", "last_k", "synthetic", "smallcnn", "resnet18", "cpu",
                             "auto", "none", "x.pt", "adam"]))
VALUES = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_config_loader_only_raises_config_error(data):
    try:
        load_config(None, data)
    except ConfigError as exc:
        assert str(exc)
