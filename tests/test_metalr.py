"""MetaLR: the exact hyper-gradient, a side-effect-free look-ahead, the LR rule, and a run."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from metalr_bench.benchmark.config import ConfigError, validate_config
from metalr_bench.benchmark.models.zoo import SmallCNN
from metalr_bench.datasets import load_dataset
from metalr_bench.strategies.core.base import StepContext, TrainSettings
from metalr_bench.strategies.core.hypergrad import Lookahead, hypergradient, update_rates
from metalr_bench.strategies.core.layers import layer_groups
from metalr_bench.strategies.metalr import MetaLR
from torch.func import functional_call


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)  # keeps float64 (the suite's loss casts to float32)


def tiny(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[SmallCNN, list]:
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, num_outputs=2, width=4).to(dtype)
    model.train()
    return model, layer_groups(model)


def batches(dtype: torch.dtype = torch.float64, n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 2, (n,), generator=g)
    xv = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    yv = torch.randint(0, 2, (n,), generator=g)
    return x, y, xv, yv


def fill_grads(model, x, y) -> None:
    model.zero_grad(set_to_none=True)
    ce(model(x), y).backward()


def val_loss_at(model, groups, alpha, xv, yv) -> torch.Tensor:
    """L_val(θ − α·g) by an explicit look-ahead, differentiable in alpha."""
    named = dict(model.named_parameters())
    params = {
        n: named[n].detach() - alpha[j] * named[n].grad.detach()
        for j, g in enumerate(groups) for n in g.params
    }
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return ce(functional_call(model, (params, buffers), (xv,)), yv)


def test_hypergradient_matches_autograd_and_finite_differences() -> None:
    model, groups = tiny()
    x, y, xv, yv = batches()
    fill_grads(model, x, y)
    alpha = torch.linspace(0.01, 0.2, len(groups), dtype=torch.float64)

    h, loss = hypergradient(Lookahead(model, groups), alpha, xv, yv, ce)

    leaf = alpha.clone().requires_grad_(True)
    ref_loss = val_loss_at(model, groups, leaf, xv, yv)
    (ref,) = torch.autograd.grad(ref_loss, leaf)
    assert torch.allclose(loss, ref_loss.detach(), rtol=1e-12)
    assert (ref.abs() > 1e-8).all(), "degenerate test: a group has no hyper-gradient"
    torch.testing.assert_close(h, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())

    eps = 1e-6
    fd = torch.empty_like(alpha)
    for j in range(len(groups)):
        e = torch.zeros_like(alpha)
        e[j] = eps
        with torch.no_grad():
            up = val_loss_at(model, groups, alpha + e, xv, yv)
            down = val_loss_at(model, groups, alpha - e, xv, yv)
        fd[j] = (up - down) / (2 * eps)
    torch.testing.assert_close(h, fd, rtol=1e-4, atol=1e-4 * fd.abs().max().item())


def test_lookahead_leaves_model_untouched() -> None:
    model, groups = tiny()
    x, y, xv, yv = batches()
    fill_grads(model, x, y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    look = Lookahead(model, groups)

    hypergradient(look, torch.full((len(groups),), 0.1, dtype=torch.float64), xv, yv, ce)

    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed by the look-ahead"
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), f"grad of {n} changed by the look-ahead"
    # the look-ahead did run BatchNorm in training mode, on the scratch copies
    means = [s for n, s in zip(look._buffer_names, look._scratch, strict=True)
             if "running_mean" in n]
    assert any(not torch.equal(m, torch.zeros_like(m)) for m in means)


def make_strategy(params: dict, lr: float = 1e-3, seed: int = 0) -> tuple[MetaLR, SmallCNN]:
    model, groups = tiny(torch.float32, seed)
    settings = TrainSettings(lr=lr, optimizer="adam", weight_decay=1e-4)
    strategy = MetaLR(params, model, groups, settings)
    strategy.build_optimizer()
    return strategy, model


def step(strategy: MetaLR, model, x, y, meta, epoch: int = 10, loss_fn=ce) -> None:
    ctx = StepContext(model=model, optimizer=strategy.optimizer, loss_fn=loss_fn,
                      autocast=_null, epoch=epoch, step=strategy.step, meta_batch=lambda: meta)
    strategy.train_step(ctx, (x, y))


def _null() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def test_lr_rises_when_gradients_align_and_falls_when_they_oppose() -> None:
    x, y, _, _ = batches(torch.float32, n=16)
    params = {"head_pin_epochs": 0, "lr_max": 1.0}

    up, model = make_strategy(params)
    before = up.alpha.clone()
    step(up, model, x, y, (x, y))  # validation batch == training batch: ⟨g', g⟩ > 0
    assert (up.hypergrad < 0).all()
    assert (up.alpha > before).all(), (before, up.alpha)
    lrs = torch.tensor([float(g["lr"]) for g in up.optimizer.param_groups])
    assert torch.equal(lrs, up.alpha), "the optimizer must step with the learned rates"

    # a validation objective whose gradient opposes the training one: L_val = −L_train
    meta_y = y.clone()

    def loss(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -ce(logits, t) if t is meta_y else ce(logits, t)

    down, model = make_strategy(params)
    step(down, model, x, y, (x, meta_y), loss_fn=loss)
    assert (down.hypergrad > 0).all()
    assert (down.alpha < before).all(), (before, down.alpha)


def test_bounds_hold() -> None:
    a = torch.tensor([1e-4, 1e-3, 5e-3])
    for rule in ("multiplicative", "additive"):
        hi = update_rates(a, torch.full((3,), -1e6), rule=rule, hyper_lr=0.1, lr_min=1e-6,
                          lr_max=1e-2)
        lo = update_rates(a, torch.full((3,), 1e6), rule=rule, hyper_lr=0.1, lr_min=1e-6,
                          lr_max=1e-2)
        assert torch.allclose(hi, torch.full((3,), 1e-2)) and torch.allclose(lo, torch.full((3,), 1e-6))
    # multiplicative rule, small step: α·(1 − η·h) exactly
    h = torch.tensor([0.5, -0.5, 0.0])
    torch.testing.assert_close(
        update_rates(a, h, rule="multiplicative", hyper_lr=0.1, lr_min=1e-6, lr_max=1e-2),
        a * torch.tensor([0.95, 1.05, 1.0]),
    )
    # through the strategy: a huge hyper-LR slams into the bounds and stays there
    x, y, _, _ = batches(torch.float32, n=16)
    s, model = make_strategy({"head_pin_epochs": 0, "hyper_lr": 5.0, "lr_max": 2e-3})
    for _ in range(3):
        step(s, model, x, y, (x, y))
        assert (s.alpha <= 2e-3).all() and (s.alpha >= 1e-6).all()
    assert (s.alpha == torch.tensor(2e-3)).sum() >= 3  # clipped at the bound, not beyond


def test_head_pin_holds_then_releases() -> None:
    x, y, _, _ = batches(torch.float32, n=16)
    s, model = make_strategy({"head_pin_epochs": 2, "lr_max": 1.0}, lr=1e-3)
    init = s.alpha.clone()
    for epoch in (0, 1):
        step(s, model, x, y, (x, y), epoch=epoch)
        assert s.alpha[-1] == torch.tensor(1e-3)  # exactly lr (in float32)
        assert float(s.optimizer.param_groups[-1]["lr"]) == pytest.approx(1e-3)
    assert (s.alpha[:-1] > init[:-1]).all()  # the backbone was learning meanwhile
    step(s, model, x, y, (x, y), epoch=2)
    assert s.alpha[-1] > torch.tensor(1e-3)  # released: aligned batches push it up


def test_meta_interval_and_resume() -> None:
    x, y, xv, yv = batches(torch.float32, n=16)
    s, model = make_strategy({"meta_interval": 2, "head_pin_epochs": 0})
    calls = []

    def meta():
        calls.append(1)
        return xv, yv

    for _ in range(4):
        ctx = StepContext(model=model, optimizer=s.optimizer, loss_fn=ce, autocast=_null,
                          epoch=0, step=s.step, meta_batch=meta)
        s.train_step(ctx, (x, y))
    assert len(calls) == 2  # meta-steps at iterations 0 and 2

    state = s.state_dict()
    other, _ = make_strategy({"meta_interval": 2, "head_pin_epochs": 0})
    other.load_state_dict(state)
    assert torch.equal(other.alpha, s.alpha) and other.step == 4
    steps, rates = other.lr_history()
    assert steps == [0, 1, 2, 3, 4] and rates.shape == (5, len(s.group_names))


@pytest.mark.parametrize("meta_batch_size", [None, 4])
def test_trainer_draws_meta_batches_of_meta_batch_size(
    meta_batch_size: int | None, tiny_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metalr_bench.benchmark.config import Cell, load_config
    from metalr_bench.benchmark.training import cell as cell_mod
    from metalr_bench.strategies import metalr

    sizes = []
    real = metalr.hypergradient
    monkeypatch.setattr(metalr, "hypergradient",
                        lambda look, a, xv, *r: (sizes.append(len(xv)), real(look, a, xv, *r))[1])
    tiny_config["datasets"][0]["options"]["n_patients"] = 200  # meta split > one batch
    tiny_config["epochs"] = 1
    cfg = load_config(None, tiny_config)
    params = {} if meta_batch_size is None else {"meta_batch_size": meta_batch_size}
    cell = Cell(dataset=cfg.datasets[0], strategy="metalr", params=params, seed=0)
    cell_mod.train_cell(cfg, cell, cell_mod.DataCache().get(cell), None)
    # one meta-step per training step, each on a meta batch of the requested size
    assert sizes and set(sizes) == {meta_batch_size or cfg.batch_size}


def test_compile_runs_metalr_through_compiled_graphs(tiny_config: dict,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile: true`: MetaLR's training forward and its functional look-ahead both run as
    compiled graphs (both compiled, both traced by Dynamo, no graph break into eager), and
    the run lands where the eager one does. The backend is aot_eager, which traces exactly what
    inductor gets (Dynamo + AOTAutograd, BN buffer mutation, gradients w.r.t. the θ̂ leaves)
    without its minute of C++ code generation on CPU."""
    import torch._dynamo
    from metalr_bench.benchmark.config import Cell, load_config
    from metalr_bench.benchmark.training import cell as cell_mod

    compiled = []
    real = torch.compile

    def compile_(fn, *a, **k):
        compiled.append(getattr(fn, "__name__", type(fn).__name__))
        return real(fn, *a, **{**k, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_)
    tiny_config["epochs"] = 1
    # a ResNet: unlike SmallCNN (an nn.Sequential) a compiled ResNet has no len(), so code that
    # truth-tests the compiled forward fails here
    tiny_config["model"] = {"arch": "resnet18", "weights": "none"}
    results = {}
    for flag in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cfg = load_config(None, {**tiny_config, "compile": flag})
        cell = Cell(dataset=cfg.datasets[0], strategy="metalr", params={}, seed=0)
        results[flag] = cell_mod.train_cell(cfg, cell, cell_mod.DataCache().get(cell), None)
    assert sorted(compiled) == ["ResNet", "_functional"]  # the model and the look-ahead
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] >= 2, dict(stats)
    assert not torch._dynamo.utils.counters["graph_break"], dict(
        torch._dynamo.utils.counters["graph_break"])
    eager, comp = results[False], results[True]
    assert comp.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"],
                                                          rel=1e-4)
    assert comp.history[0]["val_loss"] == pytest.approx(eager.history[0]["val_loss"], rel=1e-3)
    assert comp.test["loss"] == pytest.approx(eager.test["loss"], rel=1e-3)


def test_params_are_validated_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="lr_min"):
        MetaLR.Params(lr_min=1e-2, lr_max=1e-3)
    model, groups = tiny(torch.float32)
    with pytest.raises(ValueError, match=r"outside \[lr_min, lr_max\]"):
        MetaLR({}, model, groups, TrainSettings(lr=0.1))
    with pytest.raises(ConfigError, match="lr_min"):
        validate_config({"strategies": [{"name": "metalr",
                                         "params": {"lr_min": 1.0, "lr_max": 0.1}}]})
    with pytest.raises(ConfigError, match="meta_source"):
        validate_config({"strategies": [{"name": "metalr", "params": {"meta_source": "test"}}]})


def test_short_run_logs_lr_curves_to_mlflow(tiny_config: dict, tmp_path: Path) -> None:
    from metalr_bench.benchmark.running.runner import run_benchmark
    from metalr_bench.strategies.core.registry import default_strategies

    assert "metalr" in default_strategies()
    cfg = validate_config({**tiny_config, "strategies": ["metalr"], "seeds": [0],
                           "log_every_n_steps": 2})
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed, [r.error for r in outcome.failed]
    run_id = outcome.results[0].run_id
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    run = client.get_run(run_id)
    names = ["stem", "block1", "block2", "block3", "head"]
    for g in names:
        hist = client.get_metric_history(run_id, f"lr/{g}")
        assert [m.step for m in hist] == [0, 1]
        assert all(1e-6 <= m.value <= 1e-2 for m in hist)
        assert client.get_metric_history(run_id, f"hypergrad/{g}")
        assert client.get_metric_history(run_id, f"step/lr/{g}")
    head = client.get_metric_history(run_id, "lr/head")
    # pinned for the first ⌈2/6⌉ = 1 of the 2 epochs (the public code's 5 of 30), then learned
    assert head[0].value == pytest.approx(cfg.lr) and head[1].value != pytest.approx(cfg.lr)
    assert [m.value for m in client.get_metric_history(run_id, "head_pinned")] == [1.0, 0.0]
    assert client.get_metric_history(run_id, "lr_spread")
    assert run.data.params["strategy.head_pin_fraction"] == str(5 / 30)
    assert run.data.params["metalr_meta_reference"] == "public_code"
    stem = client.get_metric_history(run_id, "lr/stem")
    assert stem[-1].value != pytest.approx(0.1 * cfg.lr, rel=1e-6)  # it learned
    assert run.data.params["strategy.meta_source"] == "train"
    assert run.data.params["meta_source"] == "train"
    assert int(run.data.params["n_train_images"]) == len(
        load_dataset("synthetic", size=16, options={"n_patients": 48}).train)
    artifacts = [a.path for a in client.list_artifacts(run_id)]
    assert "lr_curves.png" in artifacts
    local = client.download_artifacts(run_id, "lr_curves.png", str(tmp_path))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(client.download_artifacts(run_id, "config.json", str(tmp_path)))
                      .read_text())["strategy"]["name"] == "metalr"


@pytest.mark.parametrize("interval", [1, 2])
def test_bench_step_runs_both_modes(interval: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from metalr_bench.benchmark.perf import bench_step
    from metalr_bench.strategies.metalr import MetaLR

    meta_steps = []
    real = MetaLR.meta_update
    monkeypatch.setattr(MetaLR, "meta_update",
                        lambda self, ctx: (meta_steps.append(self.step), real(self, ctx))[1])
    from metalr_bench.strategies import metalr

    meta_rows = []
    real_hg = metalr.hypergradient
    monkeypatch.setattr(metalr, "hypergradient",
                        lambda look, a, xv, *r: (meta_rows.append(len(xv)),
                                                 real_hg(look, a, xv, *r))[1])
    (row,) = bench_step.main(["--arch", "smallcnn", "--size", "16", "--batch", "4",
                              "--in-channels", "1", "--device", "cpu", "--warmup", "1",
                              "--iters", "3", "--no-memory", "--meta-interval", str(interval),
                              "--meta-batch", "2"])
    assert row["full_s"] > 0 and row["metalr_s"] > 0
    assert row["meta_interval"] == interval and row["meta_batch"] == 2
    assert set(meta_rows) == {2}
    assert meta_steps == list(range(0, 4, interval))  # warmup + 3 timed iterations
    assert row["time_ratio"] == pytest.approx(row["metalr_s"] / row["full_s"])
