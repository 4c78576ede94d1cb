"""The families a reviewer asks for: from scratch (the lower bound), BitFit, LoRA, SAM/ASAM and
WiSE-FT; each checked against its formula (a hand computation), then run once through the cell
builder and the trainer on synthetic data with smallcnn and a tiny ResNet-18."""

from __future__ import annotations

import copy
import math
from typing import Any

import mlflow
import pytest
import torch
from metalr_bench.benchmark.config import validate_config
from metalr_bench.benchmark.models.zoo import build_model
from metalr_bench.benchmark.perf.bench_throughput import random_bundle
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.trainer import TrainerSettings, seed_everything
from metalr_bench.strategies import StepContext, TrainSettings, get_strategy
from metalr_bench.strategies.core.layers import layer_groups
from torch import nn


def _pretrained(arch: str, seed: int = 123) -> dict[str, torch.Tensor]:
    """A stand-in for pre-trained weights: another seed's model, BatchNorm statistics moved."""
    torch.manual_seed(seed)
    model = build_model(arch, 1, 2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.state_dict()


def _step_context(model: nn.Module, opt: torch.optim.Optimizer) -> StepContext:
    import contextlib

    return StepContext(model=model, optimizer=opt, loss_fn=nn.functional.cross_entropy,
                       autocast=contextlib.nullcontext, epoch=0, step=0)


# -- scratch ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["smallcnn", "resnet18"])
def test_scratch_starts_from_a_fresh_model_of_the_seed_not_the_pretrained_one(arch: str) -> None:
    pre = _pretrained(arch)
    state = {}
    for name in ("scratch", "full"):
        seed_everything(7)  # what build_cell does with the cell's seed
        built = build_parts(arch, 1, 2, name, None, TrainSettings(), weights=pre,
                      weights_source="pretrain")
        state[name] = {k: v.clone() for k, v in built.model.state_dict().items()}
    torch.manual_seed(7)
    fresh = build_model(arch, 1, 2).state_dict()
    backbone = [k for k in pre if not k.startswith(("fc.", "head."))]
    # the same cell with `full` does load the pre-trained backbone (the set-up is right) ...
    assert all(torch.equal(state["full"][k], pre[k]) for k in backbone)
    # ... `scratch` does not: it is, bit for bit, the zoo's model under the cell's seed
    assert all(torch.equal(state["scratch"][k], fresh[k]) for k in fresh)
    differ = [k for k in backbone if pre[k].is_floating_point()
              and not torch.equal(state["scratch"][k], pre[k])]
    assert len(differ) >= len([k for k in backbone if k.endswith("weight")])


def test_new_strategies_run_through_the_runner(tiny_config) -> None:
    """One grid with every new strategy: each run finishes and logs its mechanism; scratch logs
    neither drift nor transferability, the others drift (LoRA's in the base names, after the
    merge) and, where conv weights moved, transferability; WiSE-FT logs the chosen α, its
    validation curve and figure."""
    tiny_config |= {"strategies": ["scratch", "full", "bitfit", "lora", "sam", "wise_ft"],
                    "seeds": [0],
                    "model": {"arch": "smallcnn", "weights": "pretrain",
                              "pretrain": {"epochs": 1, "options": {"n_images": 64}}}}
    cfg = validate_config(tiny_config)
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed, [r.error for r in outcome.failed]
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    runs = {r.cell.strategy: client.get_run(r.run_id) for r in outcome.results}
    groups = {"stem", "block1", "block2", "block3", "head"}
    for name, run in runs.items():
        metrics = run.data.metrics
        assert "test_auc" in metrics, name
        drift = {k.removeprefix("drift/") for k in metrics if k.startswith("drift/")}
        transfer = [k for k in metrics if k.startswith("transferability/")]
        if name == "scratch":
            assert not drift and not transfer
        else:
            assert drift == groups, name
            # T compares conv/linear weights only: BitFit never moves one, nor WiSE-FT at α = 0
            moved = name != "bitfit" and metrics.get("wise_ft/alpha", 1.0) > 0
            assert bool(transfer) == moved, name
        mechanism = get_strategy(name).mechanism
        if mechanism is not None:
            assert mechanism in metrics, (name, mechanism)
    assert 0 < runs["lora"].data.metrics["trainable_share"] < 1
    assert 0 < runs["bitfit"].data.metrics["trainable_share"] < 1
    wise = runs["wise_ft"]
    assert 0 <= wise.data.metrics["wise_ft/alpha"] <= 1
    assert len([k for k in wise.data.metrics if k.startswith("wise_ft/val_auc/alpha_")]) == 11
    assert "wise_ft_alpha.png" in {a.path for a in client.list_artifacts(wise.info.run_id)}


# -- BitFit ---------------------------------------------------------------------------------------
class _BiasNet(nn.Sequential):
    """Convolutions and a linear layer with biases, BatchNorm and LayerNorm: every kind of
    parameter BitFit has to sort."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("stem", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
                                              nn.ReLU()))
        self.add_module("block", nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                               nn.GroupNorm(2, 4), nn.ReLU(),
                                               nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        self.add_module("mlp", nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU()))
        self.add_module("head", nn.Linear(6, 2))


@pytest.mark.parametrize("norm_scale", [False, True])
@pytest.mark.parametrize("arch", ["bias-net", "smallcnn", "resnet18"])
def test_bitfit_moves_only_biases_norm_parameters_and_the_head(arch: str,
                                                               norm_scale: bool) -> None:
    torch.manual_seed(0)
    model = _BiasNet() if arch == "bias-net" else build_model(arch, 1, 2)
    groups = layer_groups(model)
    strategy = get_strategy("bitfit")({"train_norm_scale": norm_scale}, model, groups,
                                      TrainSettings(lr=0.1, optimizer="adam", weight_decay=1e-2))
    opt = strategy.build_optimizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head = set(groups[-1].params)
    norm = {f"{mn}.{pn}" for mn, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm)
            for pn, _ in m.named_parameters(recurse=False)} if norm_scale else set()
    trained = {n for n in before if n in head or n in norm or n.endswith(".bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        strategy.set_train_mode(model)
        x, y = torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 2, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = dict(model.named_parameters())
    frozen = [n for n in before if n not in trained]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)  # bit-identical
    assert all(not torch.equal(before[n], after[n]) for n in trained)
    values = strategy.log_values()
    n_trained = sum(before[n].numel() for n in trained)
    assert values["trainable_params"] == n_trained
    assert values["trainable_share"] == pytest.approx(
        n_trained / sum(p.numel() for p in before.values()))
    assert strategy.mechanism == "trainable_share"


# -- SAM / ASAM -------------------------------------------------------------------------------------
def _quadratic() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear model, its input and target: L(w, b) = ½·mean‖Wx + b − y‖² per batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    return model, x, y


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def _grad(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """∇L by hand: r = Wx + b − y per row, ∂L/∂W = mean r xᵀ, ∂L/∂b = mean r."""
    r = x @ w.T + b - y
    return r.T @ x / len(x), r.mean(0)


@pytest.mark.parametrize("adaptive, eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_sam_perturbation_and_update_equal_the_formula(adaptive: bool, eta: float) -> None:
    model, x, y = _quadratic()
    rho, lr = 0.3, 0.1
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    groups = layer_groups(model)
    strategy = get_strategy("sam")({"rho": rho, "adaptive": adaptive, "eta": eta}, model, groups,
                                   TrainSettings(lr=lr, optimizer="sgd", momentum=0.0,
                                                 weight_decay=0.0))
    opt = strategy.build_optimizer()
    ctx = _step_context(model, opt)
    ctx.loss_fn = _mse
    strategy.on_epoch_start(0)
    loss = strategy.train_step(ctx, (x, y))
    # by hand: g at w; ε (SAM: ρ g/‖g‖; ASAM: ρ T²g/‖Tg‖, T = |w| + η on the weight, 1 on b)
    gw, gb = _grad(w0, b0, x, y)
    if adaptive:
        tw, tb = w0.abs() + eta, torch.ones_like(b0)
    else:
        tw, tb = torch.ones_like(w0), torch.ones_like(b0)
    norm = torch.cat([(tw * gw).flatten(), (tb * gb).flatten()]).norm()
    ew, eb = rho * tw**2 * gw / norm, rho * tb**2 * gb / norm
    assert torch.cat([ew.flatten(), eb.flatten()]).norm() > 0
    if not adaptive:
        assert torch.cat([ew.flatten(), eb.flatten()]).norm().item() == pytest.approx(rho)
    sgw, sgb = _grad(w0 + ew, b0 + eb, x, y)  # the gradient at w + ε
    assert torch.allclose(model[0].weight.detach(), w0 - lr * sgw, atol=1e-6)
    assert torch.allclose(model[0].bias.detach(), b0 - lr * sgb, atol=1e-6)
    assert loss.item() == pytest.approx(_mse(x @ w0.T + b0, y).item(), rel=1e-6)
    values = strategy.log_values()
    sharp = _mse(x @ (w0 + ew).T + b0 + eb, y) - _mse(x @ w0.T + b0, y)
    assert values["sam/sharpness"] == pytest.approx(sharp.item(), rel=1e-5)
    assert values["sam/sharpness"] > 0
    assert values["sam/grad_norm"] == pytest.approx(norm.item(), rel=1e-5)


def test_sam_counts_each_batch_once_in_the_batchnorm_statistics() -> None:
    """The second forward (at w + ε) must not update the running statistics again: after a SAM
    step they equal those of one plain forward of the batch at w."""
    torch.manual_seed(0)
    model = build_model("smallcnn", 1, 2)
    reference = copy.deepcopy(model)
    groups = layer_groups(model)
    strategy = get_strategy("sam")(None, model, groups, TrainSettings(lr=1e-2))
    opt = strategy.build_optimizer()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 2, (8,))
    strategy.set_train_mode(model)
    strategy.train_step(_step_context(model, opt), (x, y))
    reference.train()
    with torch.no_grad():
        reference(x)
    buffers = dict(model.named_buffers())
    for name, buf in reference.named_buffers():
        assert torch.equal(buffers[name], buf), name
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# -- LoRA -----------------------------------------------------------------------------------------
class _ConvMLP(nn.Sequential):
    """A convolution, a linear layer in the backbone, a linear head: both kinds LoRA adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("stem", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
                                              nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()))
        self.add_module("mlp", nn.Sequential(nn.Linear(16, 6), nn.ReLU()))
        self.add_module("head", nn.Linear(6, 2))


def _lora_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return _ConvMLP() if arch == "conv-mlp" else build_model(arch, 1, 2)


@pytest.mark.parametrize("arch", ["conv-mlp", "smallcnn", "resnet18"])
def test_lora_starts_as_the_base_model_and_trains_only_adapters_and_head(arch: str) -> None:
    pytest.importorskip("peft")
    model = _lora_model(arch)
    base = copy.deepcopy(model).eval()
    groups = layer_groups(model)
    strategy = get_strategy("lora")({"r": 2}, model, groups, TrainSettings(lr=1e-2))
    model.eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # B = 0: the pre-trained function, exactly
    # every conv/linear outside the head is adapted; the head trains in full, nothing else
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
             and not n.startswith(groups[-1].modules)]
    assert sorted(strategy.targets) == sorted(convs)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trained if n.startswith(tuple(m + "." for m in groups[-1].modules))}
    assert head == set(groups[-1].params)
    assert {n.rsplit(".", 3)[0] for n in trained - head} == set(convs)
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trained - head)
    # the starting state in the base names is the base model's
    start = strategy.start_state()
    assert start.keys() == base.state_dict().keys()
    assert all(torch.equal(start[k], v) for k, v in base.state_dict().items())
    opt = strategy.build_optimizer()
    assert {pg["name"] for pg in opt.param_groups} == {g.name for g in groups}
    values = strategy.log_values()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert values["trainable_params"] == n
    assert values["trainable_share"] == pytest.approx(n / sum(p.numel() for p in
                                                             model.parameters()))


@pytest.mark.parametrize("r, alpha", [(2, None), (3, 12.0)])
def test_lora_merged_weights_equal_w_plus_scaled_b_times_a(r: int, alpha: float | None) -> None:
    """After training moved A and B, the merge leaves W + (α/r)·B·A in the base layer's own
    names, A flattened to r × (in·kh·kw) for a convolution, for every adapted layer."""
    pytest.importorskip("peft")
    from metalr_bench.strategies.core.base import EndContext

    model = _lora_model("conv-mlp")
    groups = layer_groups(model)
    strategy = get_strategy("lora")({"r": r, "alpha": alpha}, model, groups, TrainSettings())
    base_names = {n for n, _ in _ConvMLP().named_parameters()}
    torch.manual_seed(1)
    expected = {}
    with torch.no_grad():
        for path in strategy.targets:
            layer = model.get_submodule(path)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            b.normal_()  # as if trained: B no longer 0
            w = layer.get_base_layer().weight
            scale = (r if alpha is None else alpha) / r
            delta = scale * (b.reshape(b.shape[0], r) @ a.reshape(r, -1))
            expected[f"{path}.weight"] = w + delta.reshape(w.shape)
    model.eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
    out = strategy.on_train_end(EndContext(model=model, evaluate_val=dict, selection_metric="auc",
                                           best_val={}))
    assert out is None  # the same function: nothing to re-measure
    named = dict(model.named_parameters())
    assert set(named) == base_names  # the base architecture's names again
    for key, want in expected.items():
        assert torch.allclose(named[key], want, atol=1e-6), key
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)


def test_lora_without_peft_names_the_extra(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    model = _lora_model("smallcnn")
    with pytest.raises(ImportError, match=r'lora.*pip install -e "\.\[lora\]"'):
        get_strategy("lora")(None, model, layer_groups(model), TrainSettings())


# -- WiSE-FT --------------------------------------------------------------------------------------
def _end_context(model: nn.Module, evaluate) -> Any:
    from metalr_bench.strategies.core.base import EndContext

    return EndContext(model=model, evaluate_val=evaluate, selection_metric="auc", best_val={})


def _wise_ft(params: dict[str, Any]) -> tuple[nn.Module, Any, dict, dict]:
    """A WiSE-FT strategy on smallcnn, its θ₀, and a θ₁ as if fine-tuning had moved every
    floating-point entry (BatchNorm statistics included) and counted batches."""
    torch.manual_seed(0)
    model = build_model("smallcnn", 1, 2)
    strategy = get_strategy("wise_ft")(params, model, layer_groups(model), TrainSettings())
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v).abs() * 0.1)
            else:
                v.add_(5)
    theta1 = {k: v.clone() for k, v in model.state_dict().items()}
    return model, strategy, theta0, theta1


@pytest.mark.parametrize("alpha, endpoint", [(0.0, "theta0"), (1.0, "theta1")])
def test_wise_ft_alpha_0_is_the_starting_model_and_1_the_fine_tuned_one(alpha, endpoint) -> None:
    model, strategy, theta0, theta1 = _wise_ft({"alpha": alpha})
    want = {"theta0": theta0, "theta1": theta1}[endpoint]
    val = strategy.on_train_end(_end_context(model, lambda: {"loss": 1.0, "auc": 0.5}))
    assert val == {"loss": 1.0, "auc": 0.5}
    for k, v in model.state_dict().items():  # bit for bit, the batch counters included: the
        assert torch.equal(v, want[k]), k   # ends are the two models exactly (issue 37)


def test_wise_ft_chooses_the_alpha_with_the_best_validation_metric_and_logs_the_curve() -> None:
    model, strategy, theta0, theta1 = _wise_ft({})
    w = "head.weight"
    target = 0.3 * theta1[w] + 0.7 * theta0[w]  # the validation metric peaks at α = 0.3

    def evaluate() -> dict[str, float]:
        d = float((model.state_dict()[w] - target).norm())
        return {"loss": d, "auc": 1.0 - d}

    val = strategy.on_train_end(_end_context(model, evaluate))
    curve = strategy.curve
    assert sorted(curve) == pytest.approx([i / 10 for i in range(11)])
    assert strategy.chosen == pytest.approx(0.3)
    assert curve[strategy.chosen]["auc"] == max(v["auc"] for v in curve.values())
    for a, v in curve.items():  # each point measured on θ(α) itself
        want = (1 - a) * theta0[w] + a * theta1[w]
        assert v["auc"] == pytest.approx(1.0 - float((want - target).norm()), abs=1e-6)
    assert val["auc"] == pytest.approx(curve[strategy.chosen]["auc"])
    assert torch.allclose(model.state_dict()[w], target, atol=1e-6)  # the model left is θ(α*)
    logged = strategy.final_values()
    assert logged["wise_ft/alpha"] == pytest.approx(0.3)
    assert logged["wise_ft/val_auc/alpha_0.3"] == pytest.approx(curve[strategy.chosen]["auc"])
    assert len([k for k in logged if k.startswith("wise_ft/val_auc/")]) == 11
    assert "wise_ft_alpha.png" in strategy.artifacts()


# -- every new strategy through the cell builder and the trainer ------------------------------------
NEW = ("scratch", "bitfit", "lora", "sam", "wise_ft")


@pytest.mark.parametrize("arch", ["smallcnn", pytest.param("resnet18", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", NEW)
def test_new_strategy_trains_through_the_cell_builder(name: str, arch: str) -> None:
    if name == "lora":
        pytest.importorskip("peft")
    bundle = random_bundle(16, 32, channels=1, n_val=16)
    seed_everything(0)
    built = build_parts(arch, 1, 2, name, get_strategy(name).test_params[0],
                  TrainSettings(lr=1e-3, epochs=1), weights=_pretrained(arch),
                  weights_source="pretrain", bundle=bundle,
                  trainer_settings=TrainerSettings(epochs=1, batch_size=8, precise_bn_batches=2))
    assert built.trainer is not None
    result = built.trainer.fit()
    assert math.isfinite(result.test["loss"]) and len(result.history) == 1
    # drift and θ_A are in the final model's own (base architecture) names
    names = dict(built.model.named_parameters())
    assert set(result.drift) == {g.name for g in built.groups}
    assert result.start_state is not None
    assert set(names) <= set(result.start_state)
    mechanism = built.strategy.mechanism
    if mechanism is not None and name != "wise_ft":
        assert mechanism in result.history[-1]
    if name == "wise_ft":
        assert 0 <= built.strategy.final_values()["wise_ft/alpha"] <= 1
        chosen = built.strategy.curve[built.strategy.chosen]
        assert result.best_val == pytest.approx(chosen)  # the numbers of the model tested
