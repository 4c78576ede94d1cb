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


# -- issue 39: the inputs a new user tripped on ------------------------------------------------
# Each stops before any training with one `run-benchmark: error:` line (the message holds no
# newline) naming the field and the fix, exit 2, and leaves nothing behind.
def _text_file(t: Path, name: str, text: str = "these are my notes") -> str:
    (t / name).write_text(text)
    return str(t / name)


ISSUE_39 = [
    # an output folder that is a file used to train ~20 s and then die in the cleanup
    ("output-dir-is-a-file", lambda c, t: ["--output-dir", _text_file(t, "afile")],
     ["`output_dir`", "afile is a file, not a folder", "--output-dir"]),
    # a folder below a file cannot be created, root or not: not writable for anyone
    ("output-dir-below-a-file", lambda c, t: ["--output-dir", _text_file(t, "f2") + "/out"],
     ["`output_dir`", "f2 is a file, not a folder", "--output-dir"]),
    # a ViT's patch larger than the image failed in the first forward pass of every cell
    ("timm-patch-larger-than-image", lambda c, t: ["--model", "timm:test_vit", "--image-size",
                                                   "8"],
     ["model 'timm:test_vit'", "8 px", "--image-size"]),
    ("checkpoint-text-file", lambda c, t: ["--weights", _text_file(t, "garbage.pt")],
     ["`model.weights`", "garbage.pt could not be read as a PyTorch file", "torch.save"]),
    ("plan-negative-seconds-per-iter", lambda c, t: ["plan", "--config", c({}),
                                                     "--seconds-per-iter", "-1"],
     ["`--seconds-per-iter`", "greater than 0", "(got -1.0)"]),
    ("tune-storage-folder-missing", lambda c, t: ["--tune", "--tune-storage",
                                                  str(t / "no" / "such" / "j.log")],
     ["`tune.storage`", "no/such does not exist", "mkdir -p"]),
    ("tune-storage-sqlite-folder-missing", lambda c, t: [
        "--tune", "--tune-storage", f"sqlite:///{t}/no/such/o.db"],
     ["`tune.storage`", "no/such does not exist", "mkdir -p"]),
    # the lr error used to read as part of the strategy's: "params of strategy 'l2sp': `alpha`:
    # ...; `lr`: ..."
    ("strategy-param-and-lr", lambda c, t: ["--config", c({
        "strategies": [{"name": "l2sp", "params": {"alpha": -1}}], "lr": -5})],
     ["2 problems", "(1) `strategies[0]`: params of strategy 'l2sp': `alpha`",
      "(2) `lr`: Input should be greater than 0 (got -5)"]),
    ("lr-nan", lambda c, t: ["--lr", "nan"], ["`lr`", "finite number", "(got nan)"]),
]
#: what none of them may say: PyTorch's weights_only advice, pydantic's bound for a NaN
NEVER = ("Please file an issue", "weights_only", "less than or equal to 10", "Traceback")


@pytest.mark.parametrize("name, make_argv, expected", ISSUE_39, ids=[c[0] for c in ISSUE_39])
def test_issue39_bad_input_gives_one_line_and_leaves_nothing(name, make_argv, expected,
                                                             tiny_config, tmp_path, capsys):
    base = {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1}
    before = set(tmp_path.iterdir())

    def config_file(extra: dict[str, Any]) -> str:
        return _write(tmp_path, {**base, **extra})

    argv = make_argv(config_file, tmp_path)
    if "--config" not in argv:
        argv = ["--config", config_file({}), *argv]
    made = set(tmp_path.iterdir()) - before  # the inputs the case wrote itself
    rc = main([*argv, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("run-benchmark: error: ") and err.count("\n") == 1, err  # one line
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    for text in NEVER:
        assert text not in err, f"{text!r} in {err!r}"
    assert set(tmp_path.iterdir()) - before == made  # no output folder, no journal folder
    client = MlflowClient(tracking_uri=tiny_config["tracking_uri"])
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_unwritable_output_dir_is_refused(tiny_config, tmp_path, capsys, monkeypatch):
    """A folder the user may not write to. Root writes anywhere, so the test (run as root here)
    simulates the refusal through ``os.access``, which is what the pre-flight asks; the
    below-a-file case above is the one that fails for root too."""
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == locked
                        else real(p, mode, *a, **k))
    path = _write(tmp_path, {**tiny_config, "seeds": [0], "strategies": ["full"],
                             "output_dir": str(locked / "out")})
    rc = main(["--config", path, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "`output_dir`" in err and "locked is not writable" in err and "--output-dir" in err
    assert list(locked.iterdir()) == []


def test_lora_without_peft_is_one_line(tiny_config, tmp_path, capsys, monkeypatch):
    """`--strategy lora` after the README's first install: peft missing (simulated: a None in
    ``sys.modules`` makes ``import peft`` raise ModuleNotFoundError, as a missing package does).
    It used to print the pre-flight's traceback ending in the (good) hint."""
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)
    path = _write(tmp_path, {**tiny_config, "seeds": [0], "strategies": ["lora"]})
    rc = main(["--config", path, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("run-benchmark: error: ")
    assert "strategy lora needs the optional package peft" in err and '".[lora]"' in err


def test_report_unknown_parent_run_id_is_one_line(mlflow_uri, tmp_path, capsys):
    MlflowClient(tracking_uri=mlflow_uri).create_experiment("quick")
    rc = main(["report", "--experiment", "quick", "--tracking-uri", mlflow_uri,
               "--parent-run-id", "deadbeef", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("run-benchmark: error: ") and "MlflowException" not in err
    assert "`--parent-run-id`" in err and "deadbeef" in err
    assert not (tmp_path / "out").exists()


def test_report_unreachable_server_fails_fast(tmp_path, capsys):
    import time

    t0 = time.monotonic()
    rc = main(["report", "--experiment", "quick", "--tracking-uri", "http://127.0.0.1:9",
               "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 10  # it used to hang (killed at 120 s)
    assert rc == 2 and err.count("\n") == 1, err
    assert "tracking server http://127.0.0.1:9 is not reachable" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [None, "not json\n"], ids=["missing", "not-json"])
def test_replay_metrics_bad_file_is_one_line_and_creates_no_store(tmp_path, capsys, monkeypatch,
                                                                   content):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "metrics.jsonl"
    if content is not None:
        f.write_text(content)
    rc = main(["replay-metrics", str(f)])  # the default store: ./mlflow.db
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("run-benchmark: error: ") and "metrics.jsonl" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_csv_relative_data_root(tmp_path, monkeypatch):
    """`--dataset csv --data-root data`: the manifest is data/manifest.csv (it used to be
    looked for at data/data/manifest.csv: the root prefixed twice)."""
    from metalr_bench.datasets import load_dataset
    from PIL import Image

    data = tmp_path / "data"
    rows = ["image,label"]
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (8, 8), color=30 * i).save(data / c / f"{i}.png")
            rows.append(f"{c}/{i}.png,{c}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    bundle = load_dataset("csv", root="data", size=8)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 20


def test_batch_larger_than_training_set_warns_and_new_store_is_quiet(tiny_config, tmp_path,
                                                                      capfd):
    """`--batch-size 100000` on a small training set: legal, so it runs, with one warning line;
    and a new store's MLflow INFO lines ("Creating initial MLflow database tables...") do not
    print under --no-progress. stderr holds the announcement and the warning, nothing else."""
    path = _write(tmp_path, {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1,
                             "tracking_uri": f"sqlite:///{tmp_path / 'new.db'}"})
    rc = main(["--config", path, "--batch-size", "100000", "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 0, err
    lines = err.strip().splitlines()
    assert any(ln.startswith("run-benchmark: 1 runs") for ln in lines), err
    warning = [ln for ln in lines if ln.startswith("run-benchmark: warning: ")]
    assert len(warning) == 1 and "`batch_size` 100000" in warning[0], err
    assert "training images" in warning[0] and "one batch per epoch" in warning[0]
    assert len(lines) == 2, err  # no "INFO mlflow.store.db.utils" lines


def test_decode_bar_follows_no_progress(tmp_path, monkeypatch, capfd):
    """An image folder of >= 2000 images shows a `decode:` bar, unless TQDM_DISABLE is set
    (what --no-progress sets): the bar's explicit ``disable=`` used to override it."""
    from metalr_bench.datasets.core.base import Split
    from metalr_bench.datasets.folder import decode_split
    from PIL import Image

    Image.new("L", (4, 4)).save(tmp_path / "x.png")
    split = Split(labels=torch.zeros(2000, dtype=torch.long), paths=[str(tmp_path / "x.png")] * 2000)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = decode_split(split, 4, 1)
    assert out.images.shape == (2000, 1, 4, 4)
    assert "decode" not in capfd.readouterr().err


def _interrupting_train_cell(with_checkpoint: bool):
    def train_cell(cfg, cell, bundle, weights, callbacks, *, checkpoint=None, resume=None, **_):
        if with_checkpoint:  # the first epoch ended: its checkpoint is on disk
            checkpoint.path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.path.write_bytes(b"x")
        raise KeyboardInterrupt
    return train_cell


@pytest.mark.parametrize("with_checkpoint", [False, True], ids=["no-epoch-done", "epoch-done"])
def test_interrupt_message_says_whether_a_checkpoint_exists(tiny_config, tmp_path, capsys,
                                                            monkeypatch, with_checkpoint):
    """Ctrl-C before the first epoch ends: no checkpoint, so the message must not claim one."""
    from metalr_bench.benchmark.running import runner

    monkeypatch.setattr(runner, "train_cell", _interrupting_train_cell(with_checkpoint))
    path = _write(tmp_path, {**tiny_config, "seeds": [0], "strategies": ["full"], "epochs": 1})
    rc = main(["--config", path, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130, err
    assert ("its last epoch is checkpointed" in err) == with_checkpoint, err
    if not with_checkpoint:
        assert "before its first epoch ended" in err and "starts over" in err, err
