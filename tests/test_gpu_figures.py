"""gpu_figures: the one command for a lent GPU runs every tool and writes what they measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from metalr_bench.benchmark.perf import gpu_figures


def test_gpu_figures_runs_every_tool_and_writes_markdown(
        tiny_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.compile
    # the compile rows through Dynamo + AOTAutograd: inductor's CPU code generation takes a minute
    monkeypatch.setattr(torch, "compile",
                        lambda fn, *a, **k: real(fn, *a, **{**k, "backend": "aot_eager"}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**tiny_config, "strategies": ["full", "metalr"]}))
    out = tmp_path / "figs"
    assert gpu_figures.main(["--out", str(out), "--device", "cpu", "--model", "smallcnn",
                             "--sizes", "16", "--batch", "8", "--iters", "2", "--warmup", "1",
                             "--strategies", "full", "metalr", "--config", str(grid)]) == 0
    step = json.loads((out / "step.json").read_text())
    assert [r["meta_batch"] for r in step] == [8, 4]  # the training batch, then half of it
    assert all(r["metalr_s"] > 0 and r["full_s"] > 0 for r in step)
    eager = json.loads((out / "t16.json").read_text())
    compiled = json.loads((out / "t16-compile.json").read_text())
    assert [r["strategy"] for r in eager] == ["full", "metalr", "eval"]
    assert {r["compile"] for r in compiled} == {True} and {r["compile"] for r in eager} == {False}
    plan = (out / "plan.txt").read_text()
    assert "total device time" in plan  # priced with the measured rows
    md = (out / "figures.md").read_text()
    for r in step:
        assert f"| {r['metalr_s'] * 1e3:.1f} | {r['time_ratio']:.2f} |" in md
    for r in eager + compiled:
        assert f"{r['ms_per_iter']:.1f} | {r['images_per_s']:.0f} |" in md
    assert plan.strip().splitlines()[-1] in md
    assert "python -m metalr_bench.benchmark.perf.bench_step --arch smallcnn" in md
    assert f"run-benchmark plan --config {grid}" in md
