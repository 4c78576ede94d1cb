"""The pre-training stage's source is a full dataset entry, it reports its epochs, and the CLI
shows the suite's warnings as one clean line.

The MedMNIST file is written by the test (official layout, so its MD5 is not the official one),
the image folder too; everything trains a SmallCNN for an epoch or two on CPU.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from metalr_bench.benchmark.cli import main
from metalr_bench.benchmark.config import CODE_VERSION, PretrainSpec, validate_config
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.pretrain import (
    PretrainSourceError,
    pretrain_key,
    pretrained_checkpoint,
    source_size,
    starting_weights,
)
from metalr_bench.datasets.core.errors import DatasetWarning
from metalr_bench.datasets.core.medmnist_info import INFO
from metalr_bench.datasets.core.registry import load_dataset
from metalr_bench.strategies.core.base import TrainSettings
from test_folder import PATTERN, make_folder
from test_medmnist import md5, write_npz

EPOCH_LINE = r"pretrain smallcnn on {name}: epoch {k}/{n} train_loss [\d.e+-]+ val_loss"


def _source(root: Path, **extra: Any) -> dict[str, Any]:
    return {"dataset": "pneumoniamnist", "root": str(root), "size": 28, "epochs": 2,
            "batch_size": 16, **extra}


def _config_file(tiny_config: dict[str, Any], tmp_path: Path, pretrain: dict[str, Any]) -> str:
    cfg = {**tiny_config, "seeds": [0], "strategies": ["full"],
           "model": {"arch": "smallcnn", "weights": "pretrain", "pretrain": pretrain}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_medmnist_source_with_md5_mismatch_trains_only_when_allowed(tmp_path, capsys) -> None:
    npz = write_npz(tmp_path / "data", "pneumoniamnist", 28, counts=(48, 16, 16))
    assert md5(npz) != INFO["pneumoniamnist"].md5[28]
    cache = tmp_path / "cache"

    spec = PretrainSpec(**_source(tmp_path / "data"))
    with pytest.raises(PretrainSourceError) as exc:
        pretrained_checkpoint("smallcnn", spec, 16, cache_dir=cache, device="cpu")
    msg = str(exc.value)
    assert msg.startswith("pretrain source 'pneumoniamnist' (size 28, root ")
    assert "MD5 mismatch" in msg and "`model.pretrain`" in msg and "allow_md5_mismatch" in msg
    assert not list(cache.glob("*.pt"))

    spec = PretrainSpec(**_source(tmp_path / "data", allow_md5_mismatch=True))
    with pytest.warns(DatasetWarning, match=r"pneumoniamnist\.npz: MD5 mismatch"):
        path = pretrained_checkpoint("smallcnn", spec, 16, cache_dir=cache, device="cpu",
                                     progress=True)
    assert path.is_file() and "-28px-" in path.name  # the source's own size, not the target's
    err = capsys.readouterr().err
    lines = err.splitlines()
    name = re.escape("pneumoniamnist@28")
    assert re.fullmatch(r"pretrain smallcnn on pneumoniamnist@28: 2 epoch\(s\) on 48 training "
                        r"images, then cached in .*", lines[0]), err
    assert re.fullmatch(EPOCH_LINE.format(name=name, k=1, n=2) + r".*\(\d+ s\)", lines[1]), err
    assert re.fullmatch(EPOCH_LINE.format(name=name, k=2, n=2) + r".*", lines[2]), err
    assert lines[3].startswith("pretrain smallcnn on pneumoniamnist@28: done in ") and len(lines) == 4
    # cached: the second call neither trains nor prints
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pretrained_checkpoint("smallcnn", spec, 64, cache_dir=cache, device="cpu",
                                     progress=True) == path
    assert capsys.readouterr().err == ""


def test_cli_pretrain_source_errors_and_warnings_are_one_clean_line(
    tiny_config, tmp_path, capsys
) -> None:
    write_npz(tmp_path / "data", "pneumoniamnist", 28, counts=(48, 16, 16))
    config = _config_file(tiny_config, tmp_path, _source(tmp_path / "data", epochs=1))
    assert main(["pretrain", "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("run-benchmark: error: pretrain source 'pneumoniamnist' (size 28"), err
    assert "MD5 mismatch" in err and "Traceback" not in err

    config = _config_file(tiny_config, tmp_path,
                          _source(tmp_path / "data", epochs=1, allow_md5_mismatch=True))
    assert main(["pretrain", "--config", config]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "warning" in line.lower()]
    assert len(warned) == 1, captured.err
    assert re.fullmatch(r"run-benchmark: warning: \S*pneumoniamnist\.npz: MD5 mismatch, [0-9a-f]{32} "
                        r"instead of the official [0-9a-f]{32}; loading it anyway because "
                        r"allow_md5_mismatch is set .*", warned[0]), warned[0]
    assert ".py:" not in captured.err and "UserWarning" not in captured.err
    assert re.search(EPOCH_LINE.format(name=re.escape("pneumoniamnist@28"), k=1, n=1),
                     captured.err), captured.err
    assert Path(captured.out.strip()).is_file()  # stdout: the checkpoint's path, nothing else

    # --no-progress: the checkpoint is cached, so nothing trains and nothing is printed on stderr
    assert main(["pretrain", "--config", config, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_library_callers_keep_pythons_warning_machinery(tmp_path) -> None:
    """The one-line format is the CLI's: outside `main`, the warning is a normal warning."""
    import warnings as w

    before = w.showwarning
    write_npz(tmp_path, "pneumoniamnist", 28)
    with pytest.warns(UserWarning, match="MD5 mismatch.*loading it anyway"):
        load_dataset("pneumoniamnist", root=tmp_path, allow_md5_mismatch=True)
    assert main(["list"]) == 0 and w.showwarning is before  # main restores the hook


def test_imagefolder_source_trains_and_feeds_a_grey_target(tiny_config, tmp_path, capsys) -> None:
    make_folder(tmp_path / "us", mode="RGB", videos=6, frames=4)  # 3 channels, 2 classes
    pretrain = {"dataset": "imagefolder", "root": str(tmp_path / "us"), "epochs": 1,
                "batch_size": 8, "options": {"group_pattern": PATTERN}}
    cfg = validate_config({**tiny_config, "model": {"arch": "smallcnn", "weights": "pretrain",
                                                    "pretrain": pretrain}})
    target = load_dataset("synthetic", size=16, options={"n_patients": 24})  # grey, 16 px
    state, source = starting_weights(cfg, target, None, None)  # progress by default
    assert source.startswith("pretrain:pretrain-smallcnn-imagefolder-16px-")
    err = capsys.readouterr().err
    assert re.search(EPOCH_LINE.format(name=re.escape("imagefolder us@16"), k=1, n=1), err), err
    settings = TrainSettings(lr=1e-3, epochs=1)
    built = build_parts("smallcnn", target.in_channels, target.num_outputs, "full", None, settings,
                  weights=state, weights_source=source)  # the RGB stem is summed to grey
    assert built.model.stem[0].weight.shape[1] == 1

    # another folder is another source: its own checkpoint, not the first folder's
    make_folder(tmp_path / "other", mode="RGB", videos=6, frames=4)
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "pretrain": cfg.model.pretrain.model_copy(update={"root": str(tmp_path / "other")})})})
    assert starting_weights(other, target, None, None, progress=False)[1] != source
    assert capsys.readouterr().err == ""  # progress=False: silent


def _old_key(arch: str, spec: PretrainSpec, size: int) -> str:
    """The key of the version before sources were full entries (caches it wrote stay valid)."""
    fields = {k: v for k, v in spec.model_dump(mode="json").items()
              if k in ("dataset", "epochs", "lr", "batch_size", "options")}
    payload = {"arch": arch, "spec": fields, "size": size, "code": CODE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def test_pretrain_key_follows_what_determines_the_checkpoint(tmp_path) -> None:
    base = PretrainSpec(dataset="pneumoniamnist", root=str(tmp_path / "a"))

    def key(spec: PretrainSpec, target: int = 28) -> str:
        return pretrain_key("resnet18", spec, source_size(spec, target))

    def with_(spec: PretrainSpec, **update: Any) -> PretrainSpec:
        return PretrainSpec(**{**spec.model_dump(), **update})

    # the code enters the key (tests/test_code_fingerprint.py); the config's part is the
    # earlier key's, the code's fingerprint added
    for spec in (PretrainSpec(), PretrainSpec(options={"n_images": 64}, epochs=1), base):
        assert key(spec) != _old_key("resnet18", spec, 28)
    changed = [with_(base, dataset="breastmnist"), with_(base, size=64),
               with_(base, allow_md5_mismatch=True), with_(base, options={"subsample_train": 5}),
               with_(base, epochs=2), with_(base, lr=0.01), with_(base, batch_size=64)]
    keys = {key(base), *(key(s) for s in changed)}
    assert len(keys) == 1 + len(changed)
    assert key(base, 64) != key(base)  # default size: the target's
    assert key(with_(base, size=28), 64) == key(base, 28)  # own size: the target's is irrelevant
    # an official MedMNIST file is pinned by its MD5: moving it or downloading it is the same
    assert key(with_(base, root=str(tmp_path / "b"))) == key(base)
    assert key(with_(base, download=True)) == key(base)
    # a file accepted despite its MD5, or a folder, is what its folder holds
    loose = with_(base, allow_md5_mismatch=True)
    assert key(with_(loose, root=str(tmp_path / "b"))) != key(loose)
    folder = PretrainSpec(dataset="imagefolder", root=str(tmp_path / "a"))
    assert key(with_(folder, root=str(tmp_path / "b"))) != key(folder)


def test_pretrain_source_is_validated_with_the_config(tiny_config) -> None:
    from metalr_bench.benchmark.config import ConfigError

    for pretrain, text in (({"dataset": "nope"}, "unknown dataset 'nope'"),
                           ({"dataset": "pneumoniamnist", "options": {"subsample": 3}},
                            "options of dataset 'pneumoniamnist'"),
                           ({"size": 4}, "model.pretrain.size")):
        with pytest.raises(ConfigError, match=re.escape(text)):
            validate_config({**tiny_config, "model": {"weights": "pretrain",
                                                      "pretrain": pretrain}})
