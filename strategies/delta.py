"""DELTA (Li et al., ICLR 2019, "DELTA: DEep Learning Transfer using Feature Map with Attention
for convolutional networks"): keep the fine-tuned network's feature maps close to the pre-trained
network's on the same images, weighting each channel by how much the task needs it.

    L = L_task + α · Σ_l ½ · c_l/(h_l·w_l) · (1/B) Σ_b Σ_j W_lj · ‖FM_lj(w, x_b) − FM_lj(w⁰, x_b)‖²
               + β · ½ · ‖w_head‖²

FM_lj is channel j of feature map l (c_l channels of h_l × w_l: the output of each *stage* of the
layer grouping, stem and head excluded; a timm model's own ``feature_info`` maps: a ViT's blocks,
channels last), w⁰ the pre-trained weights run by a frozen copy of the
model, b the images of the batch. ``attention: true`` (the paper's DELTA): W_lj from the loss rise
when channel j is removed, measured once in the first step with a head fitted on the frozen
features, ``softmax(z / 5)`` of the per-map z-scores; ``attention: false``: W_lj = 1/c_l.

Defaults: α = β = 0.01 (the reference code, lixingjian/DELTA), weight decay 0 (the regularisers
replace it), every layer at the base LR, ``attention: true``, ``attention_batches`` 2.
Logged: ``delta/penalty`` and ``delta/task_loss`` per step, ``delta/penalty_share`` per epoch
(the ``mechanism``).

Deviations (the penalty a mean over the batch's images, not the reference's sum; stage outputs
as feature maps, 1/(h·w) kept without attention, the attention's head
fitted by Adam on its batches, un-augmented attention batches, the frozen copy's BatchNorm
following the fine-tuned model's mode), each with its reason, the cost, and how it is built:
docs/strategies.md, section ``delta``.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from metalr_bench.strategies.core.base import StepContext, Strategy, register
from metalr_bench.strategies.core.layers import feature_maps
from metalr_bench.strategies.core.penalty import PenaltyMeter
from metalr_bench.strategies.core.space import LR, SearchDim
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

#: softmax temperature of the attention (reference ``train.py``: ``F.softmax(cw / 5)``)
TEMPERATURE = 5.0
#: full-batch Adam steps fitting the head on frozen features before the attention
PROBE_STEPS = 200
PROBE_LR = 1e-2
PROBE_WEIGHT_DECAY = 1e-4
#: images per forward of the frozen copy while measuring channel importance
_ABLATION_IMAGES = 256


class DeltaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.01, ge=0, description="α, weight of the feature-map penalty")
    beta: float = Field(0.01, ge=0, description="β, weight of the L2 penalty on the new head")
    attention: bool = Field(True, description="weight channels by the pre-trained network's "
                            "attention (DELTA); false: every channel alike")
    attention_batches: int = Field(2, ge=1, le=64, description="training batches the attention "
                                   "is measured on (once, in the first step)")


def _keep_output(store: dict[Any, Any], key: int) -> Any:
    """Forward hook for the fine-tuned model: keep the output while gradients are enabled."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            store[key] = output

    return hook


def _frozen_output(store: dict[Any, Any], key: int, channel_axis: int = 1) -> Any:
    """Forward hook for the frozen copy: keep the output; while ``store["ablate"] == key``
    (channel importance), return ``k`` copies of it, copy ``i`` with the channels (on
    ``channel_axis``) that ``store["mask"][i]`` zeroes removed, so that only the layers after
    this map run on the ``k`` copies (the layers before it ran on the plain batch only)."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        if store.get("ablate") == key:
            mask = store["mask"]  # (k, channels)
            k, b = mask.shape[0], output.shape[0]
            shape = [1] * (output.ndim + 1)
            shape[0], shape[1 + channel_axis % output.ndim] = mask.shape
            output = (output.unsqueeze(0) * mask.view(shape).to(output.dtype)).reshape(
                k * b, *output.shape[1:])
        store[key] = output
        return output

    return hook


def _frozen_head_input(store: dict[Any, Any]) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        store["head_in"] = args[0]

    return hook


def feature_distance(live: list[torch.Tensor], ref: list[torch.Tensor],
                     weights: list[torch.Tensor] | None) -> torch.Tensor:
    """Σ_l ½ · c_l/(h_l·w_l) · (1/B) Σ_b Σ_j W_lj ‖Δ_lbj‖² (W_lj = 1/c_l when ``weights`` is
    None), in float32: a mean over the B images, as the task loss is."""
    total = torch.zeros((), device=live[0].device)
    for i, (a, b) in enumerate(zip(live, ref, strict=True)):
        d = (a.float() - b.float()).flatten(2) if a.ndim > 2 else (a.float() - b.float())[..., None]
        per_channel = d.pow(2).sum(2)  # (batch, channels): ‖Δ_bj‖² over the positions
        c, hw = d.shape[1], d.shape[2]
        if weights is None:
            total = total + 0.5 / hw * per_channel.sum()
        else:
            total = total + 0.5 * c / hw * (per_channel * weights[i]).sum()
    return total / live[0].shape[0]


@register
class Delta(Strategy):
    """DELTA: feature maps held near the pre-trained ones, channels weighted (ICLR 2019)."""

    name = "delta"
    Params = DeltaParams
    test_params = [{"attention": True, "attention_batches": 1}, {"attention": False}]
    search_space = {"lr": LR, "alpha": SearchDim("float", 1e-4, 1.0, log=True)}
    meta_source = "train"  # class default; each instance takes its own from `attention`
    mechanism = "delta/penalty_share"

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        p: DeltaParams = self.params
        self.meta_source = "train" if p.attention else None
        head = groups[-1].modules
        if len(head) != 1:
            raise ValueError(f"delta needs a head made of one module; the last layer group "
                             f"{groups[-1].name!r} holds {list(head)}")
        #: (name, module path) of each feature map, and the maps' channel axis (the model's)
        self.stages, self.channel_axis = feature_maps(model, groups)
        if not self.stages:
            raise ValueError("delta needs at least one layer group between the stem and the "
                             "head (its feature maps)")
        named = dict(model.named_parameters())
        self.head_params = [named[n] for n in groups[-1].params]
        #: the pre-trained network w⁰: never trained, eval mode, no gradients
        self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        #: (fine-tuned BatchNorm, its twin in the frozen copy): the twin normalises with batch
        #: statistics whenever the fine-tuned one does (``_matched_norms``)
        frozen_modules = dict(self.frozen.named_modules())
        self._norm_pairs = [(m, frozen_modules[name]) for name, m in model.named_modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._live: dict[Any, Any] = {}
        self._ref: dict[Any, Any] = {}
        handles = []
        for i, (_, path) in enumerate(self.stages):
            handles.append(model.get_submodule(path).register_forward_hook(
                _keep_output(self._live, i)))
            self.frozen.get_submodule(path).register_forward_hook(
                _frozen_output(self._ref, i, self.channel_axis))
        self.frozen.get_submodule(head[0]).register_forward_hook(_frozen_head_input(self._ref))
        for h in handles:  # the frozen copy dies with the strategy; the model does not
            weakref.finalize(self, h.remove)
        self.device = next(model.parameters()).device
        #: per feature map, the channel weights W_l (sum 1); None until the first step
        self.attention: list[torch.Tensor] | None = None
        #: the head fitted on frozen features for the attention (None before / without it)
        self.probe: nn.Module | None = None
        #: the last step's feature and head penalties (before α, β), for the epoch log
        self.last_penalties = torch.zeros(2, device=self.device)
        #: epoch means of α · feature penalty and of the task loss
        self.meter = PenaltyMeter(self.name, self.device)
        #: the last step's α · feature penalty and task loss (``step_values``); None before
        self._step_values: dict[str, torch.Tensor] = {}

    def param_groups(self) -> list[dict[str, Any]]:
        # the penalties replace weight decay, as in the reference
        return [self._group(i, lr=self.settings.lr, weight_decay=0.0)
                for i in range(len(self.groups))]

    # -- the penalties -----------------------------------------------------------------------------
    def forward_with_penalty(self, forward: Callable[[torch.Tensor], torch.Tensor],
                             x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``forward`` (the fine-tuned model) and the frozen copy on ``x``; return the logits
        and the feature-map penalty (before α). Call with gradients enabled."""
        self._live.clear()
        logits = forward(x)
        live = [self._live.pop(i, None) for i in range(len(self.stages))]
        if any(t is None for t in live):
            raise RuntimeError("delta: the feature-map hooks did not fire; run the model with "
                               "gradients enabled")
        with torch.no_grad(), self._matched_norms():
            self._ref.clear()
            self.frozen(x)
            ref = [self._ref[i] for i in range(len(self.stages))]
            self._ref.clear()
        return logits, feature_distance([self._channels_first(t) for t in live],
                                        [self._channels_first(t) for t in ref], self.attention)

    def _channels_first(self, t: torch.Tensor) -> torch.Tensor:
        """A feature map with its channels on axis 1 (a ViT's (N, tokens, C) -> (N, C, tokens))."""
        return t if self.channel_axis == 1 else t.movedim(self.channel_axis, 1)

    @contextlib.contextmanager
    def _matched_norms(self) -> Iterator[None]:
        """While open, each BatchNorm of the frozen copy whose twin in the fine-tuned model is in
        train mode normalises with the batch's statistics and updates nothing: its running
        buffers are set aside (a BatchNorm without running buffers uses batch statistics, in
        any mode) and put back on exit, bit for bit."""
        kept = []
        try:
            for live, twin in self._norm_pairs:
                if live.training:
                    kept.append((twin, twin.running_mean, twin.running_var))
                    twin.running_mean, twin.running_var = None, None
            yield
        finally:
            for twin, mean, var in kept:
                twin.running_mean, twin.running_var = mean, var

    def head_penalty(self) -> torch.Tensor:
        """½ · ‖w_head‖² (weights and biases of the head, as the reference), before β."""
        return 0.5 * sum(p.float().pow(2).sum() for p in self.head_params)

    def train_step(self, ctx: StepContext, batch: tuple[torch.Tensor, torch.Tensor]
                   ) -> torch.Tensor:
        x, y = batch
        p: DeltaParams = self.params
        if p.attention and self.attention is None:
            batches = ([ctx.meta_batch() for _ in range(p.attention_batches)]
                       if ctx.meta_batch is not None else [batch])
            with self.one_off("attention"):  # once per run: not part of the epoch's time
                self.attention = self.compute_attention(batches, ctx.loss_fn, ctx.autocast)
        forward = ctx.model if ctx.forward is None else ctx.forward
        ctx.optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            logits, feature = self.forward_with_penalty(forward, x)
            loss = ctx.loss_fn(logits, y)
            head = self.head_penalty()
            total = loss + p.alpha * feature + p.beta * head
        total.backward()
        ctx.optimizer.step()
        self.last_penalties = torch.stack([feature.detach(), head.detach()])
        weighted = p.alpha * feature.detach()
        self.meter.add_penalty(weighted)
        self.meter.add_task_loss(loss)
        self._step_values = {"delta/penalty": weighted, "delta/task_loss": loss.detach()}
        return loss.detach()

    def on_epoch_start(self, epoch: int) -> None:
        self.meter.reset()

    def step_values(self) -> dict[str, torch.Tensor]:
        values, self._step_values = self._step_values, {}
        return values

    # -- the attention -----------------------------------------------------------------------------
    def _frozen_features(self, x: torch.Tensor,
                         autocast: Callable[[], AbstractContextManager[Any]]) -> torch.Tensor:
        with torch.no_grad(), autocast():
            self.frozen(x)
        features = self._ref.pop("head_in")
        for i in range(len(self.stages)):
            self._ref.pop(i, None)
        return features.float()

    def compute_attention(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> list[torch.Tensor]:
        """W_l per feature map from the frozen network and ``batches`` of labelled images: fit
        the head (``self.probe``), then the softmax of the standardised loss rise per removed
        channel (see the module docstring)."""
        feats = [self._frozen_features(x, autocast) for x, _ in batches]
        labels = torch.cat([y for _, y in batches])
        head_path = self.groups[-1].modules[0]
        probe = copy.deepcopy(self.frozen.get_submodule(head_path)).float().requires_grad_(True)
        opt = torch.optim.Adam(probe.parameters(), lr=PROBE_LR, weight_decay=PROBE_WEIGHT_DECAY)
        inputs = torch.cat(feats)
        with torch.enable_grad():
            for _ in range(PROBE_STEPS):
                opt.zero_grad(set_to_none=True)
                loss_fn(probe(inputs), labels).backward()
                opt.step()
        self.probe = probe.eval().requires_grad_(False)

        rises = []
        with torch.no_grad():
            base = [loss_fn(self.probe(f), y) for f, (_, y) in zip(feats, batches, strict=True)]
            for i in range(len(self.stages)):
                rise = None
                for (x, y), loss0 in zip(batches, base, strict=True):
                    r = self._channel_losses(i, x, y, loss_fn, autocast) - loss0
                    rise = r if rise is None else rise + r
                rises.append(rise / len(batches))
        weights = []
        for r in rises:
            z = (r - r.mean()) / r.std(correction=0).clamp_min(1e-12)
            weights.append(torch.softmax(z / TEMPERATURE, 0))
        return weights

    def _channel_losses(self, stage: int, x: torch.Tensor, y: torch.Tensor,
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        autocast: Callable[[], AbstractContextManager[Any]]) -> torch.Tensor:
        """The task loss on (x, y) with each channel of feature map ``stage`` zeroed in turn.

        Per group of ``k`` channels the frozen copy runs the layers before the map on the plain
        batch, and the map's hook hands the layers after it ``k`` masked copies (``_frozen_output``), so
        ablating a late map costs a few late layers, not ``k`` whole networks (ResNet-18 at
        28 px: 960 channels, most of them in ``layer3``/``layer4``)."""
        assert self.probe is not None
        b = x.shape[0]
        with torch.no_grad(), autocast():
            self._ref.clear()
            self.frozen(x[:1])
            channels = self._ref[stage].shape[self.channel_axis]
        per_forward = max(1, _ABLATION_IMAGES // b)
        losses = []
        try:
            for start in range(0, channels, per_forward):
                idx = torch.arange(start, min(start + per_forward, channels), device=x.device)
                k = len(idx)
                mask = torch.ones(k, channels, device=x.device)
                mask[torch.arange(k, device=x.device), idx] = 0
                self._ref["ablate"], self._ref["mask"] = stage, mask
                feats = self._frozen_features(x, autocast)
                if feats.shape[0] != k * b:
                    raise RuntimeError(
                        f"delta: the layers after feature map {self.stages[stage][0]!r} did not "
                        f"carry its {k} ablated copies through to the head ({feats.shape[0]} "
                        f"rows, expected {k * b}); the model mixes images across the batch")
                logits = self.probe(feats)
                # one task loss per copy of the batch, in one call
                losses.append(torch.func.vmap(loss_fn)(logits.view(k, b, *logits.shape[1:]),
                                                       y.expand(k, *y.shape)))
        finally:
            self._ref.clear()
        return torch.cat(losses)

    # -- reporting and resume ----------------------------------------------------------------------
    def log_values(self) -> dict[str, float]:
        feature, head = self.last_penalties.tolist()
        share = {k: v for k, v in self.meter.values().items() if k.endswith("_share")}
        return super().log_values() | {"delta/feature": feature, "delta/head": head} | share

    def state_dict(self) -> dict[str, Any]:
        return {"attention": None if self.attention is None
                else [w.detach().cpu() for w in self.attention]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        att = state.get("attention")
        self.attention = None if att is None else [w.to(self.device) for w in att]
