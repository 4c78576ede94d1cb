"""MetaLR (Chen et al., MICCAI 2023): layer-wise learning rates meta-learned online.

Each iteration, with a training batch and a meta (validation) batch:

1. look-ahead   θ̂_j = θ_j − α_j·g_j, with g = ∇_θ L_train(θ), per layer group j;
2. LR update    α_j ← α_j − η·∂L_val(θ̂)/∂α_j (multiplicative by default, see below);
3. real update  of θ with the new α_j by the real optimizer, reusing g.

The hyper-gradient is exact and first-order (:mod:`metalr_bench.strategies.core.hypergrad`): one
extra forward/backward on the meta batch per meta-step, no model copy.

Defaults, the public code's (Schuture/MetaLR, ``MetaLR_POCUS/train.py``): groups = stem, each
residual block, head; α⁰ = backbone_lr_scale·lr = 0.1·lr for the backbone and lr for the head
(:func:`initial_rates`); α ← clip(α·(1 − η·h), 1e-6, 1e-2) with η = 0.1 and the raw h; the
head's rate pinned to lr for the first 1/6 of the run (``head_pin_fraction``,
:func:`pinned_epochs`); ``meta_source: train`` (:data:`META_REFERENCE` logs ``public_code`` or
``paper``); the benchmark's optimizer (Adam, weight decay 1e-4). Tuned: lr in 1e-5..1e-2
(:meth:`MetaLR.constrain_space`).

Deviations from the public code: the look-ahead descends, the meta batch is a fresh batch, the
epoch is chosen on validation, the head pin is a share of the run; the reasons, the training
settings and the meta batch choices: docs/strategies.md, section ``metalr``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from metalr_bench.strategies.core.base import (
    SpaceError,
    StepContext,
    Strategy,
    lr_spread,
    register,
)
from metalr_bench.strategies.core.hypergrad import Lookahead, hypergradient, update_rates
from metalr_bench.strategies.core.optim import OptimizerName, create_optimizer
from metalr_bench.strategies.core.space import SearchDim
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: keep at most this many LR snapshots for the figure (older ones are thinned 2:1)
_MAX_HISTORY = 2048

#: the public code pins the head's rate for its first 5 of 30 epochs (``train.py``: ``if epoch
#: <= 5`` with 1-based epochs, ``--max-epoch 30``)
PUBLIC_HEAD_PIN_FRACTION = 5 / 30

#: which reference each meta source follows (logged as ``metalr_meta_reference``): the public
#: code meta-learns on training images (``first``: the batch it really uses, ``metalr_public``),
#: the paper on a held-out validation batch
META_REFERENCE = {"train": "public_code", "first": "public_code", "holdout": "paper",
                  "fixed": "paper", "val": "paper"}


def initial_rates(lr: float, backbone_lr_scale: float, n_groups: int) -> list[float]:
    """MetaLR's starting rates (the public code's ``now_lr``): backbone_lr_scale·lr for every
    backbone group, lr for the head (the last group). ``discriminative`` starts (and stays) at
    the same rates."""
    return [backbone_lr_scale * lr] * (n_groups - 1) + [lr]


def pinned_epochs(fraction: float | None, epochs: int | None, total: int) -> int:
    """How many first epochs keep the head's rate at lr: ``epochs`` when given, else
    ⌈fraction·total⌉ (a positive share pins at least one epoch; 1e-9 absorbs the rounding of
    e.g. 30·(5/30))."""
    if epochs is not None:
        return epochs
    return math.ceil((fraction or 0.0) * total - 1e-9)


class MetaLRParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyper_lr: float = Field(0.1, ge=0, description="η, the step size of the LR update (0: the "
                            "rates never move; the run is then `discriminative`'s, bit for bit)")
    update: Literal["multiplicative", "additive"] = Field(
        "multiplicative",
        description="multiplicative: α·(1−η·h) (public code); additive: α−η·h (needs a much "
        "smaller hyper_lr, e.g. 1e-4)",
    )
    lr_min: float = Field(1e-6, gt=0, description="lower bound on every learned LR")
    lr_max: float = Field(1e-2, gt=0, description="upper bound on every learned LR")
    backbone_lr_scale: float = Field(0.1, gt=0, description="initial backbone LR = scale · lr")
    meta_interval: int = Field(1, ge=1, description="update the LRs every k iterations")
    meta_source: Literal["train", "holdout", "fixed", "val"] = Field(
        "train",
        description="train (default): a fresh, un-augmented batch of the training set at each "
        "meta-step, so MetaLR trains on exactly the images every baseline gets; holdout: a "
        "held-out 20 %% of the training data (MetaLR then trains on 80 %%), re-sampled each "
        "meta-step; fixed: one held-out batch; val: the real validation split (also used for "
        "model selection, so its scores become optimistic)".replace("%%", "%"),
    )
    meta_batch_size: int | None = Field(
        None, ge=2, description="images per meta batch; default: the training batch size. "
        "Each meta-step's extra forward/backward runs on it, so half the batch costs about half "
        "the extra time, for a noisier hyper-gradient",
    )
    head_pin_fraction: float = Field(
        PUBLIC_HEAD_PIN_FRACTION, ge=0, le=1,
        description="keep the head's LR at lr for the first ⌈fraction·epochs⌉ epochs; default "
        "1/6, the public code's 5 of 30 epochs",
    )
    head_pin_epochs: int | None = Field(
        None, ge=0, description="keep the head's LR at lr this many first epochs instead of "
        "head_pin_fraction (set one of the two)",
    )
    optimizer: OptimizerName | None = Field(
        None, description="real optimizer; default: the benchmark's optimizer setting"
    )

    @model_validator(mode="after")
    def _consistent(self) -> MetaLRParams:
        if self.head_pin_epochs is not None and "head_pin_fraction" in self.model_fields_set:
            raise ValueError(
                "set head_pin_fraction (a share of the run) or head_pin_epochs (a count), not "
                "both"
            )
        if self.lr_min >= self.lr_max:
            raise ValueError(
                f"lr_min ({self.lr_min:g}) must be smaller than lr_max ({self.lr_max:g})"
            )
        if self.update == "multiplicative" and self.hyper_lr >= 10:
            raise ValueError(
                f"hyper_lr={self.hyper_lr:g} with the multiplicative rule flips the sign of "
                "α·(1−η·h) for any |h| > 1/η; use a value below 10 (default 0.1)"
            )
        return self


@register
class MetaLR(Strategy):
    """Meta-learned layer-wise learning rates with an exact first-order hyper-gradient."""

    name = "metalr"
    Params = MetaLRParams
    test_params = [
        {},
        {"update": "additive", "hyper_lr": 1e-4, "meta_interval": 2, "meta_source": "fixed",
         "head_pin_epochs": 1},
    ]
    meta_source = "train"  # class default; each instance takes its own from params
    mechanism = "lr_spread"
    #: False: the rates stay at their starting values (``discriminative``): no meta-step
    learns_rates: ClassVar[bool] = True
    #: lr tops out at the default lr_max (1e-2): the head starts at lr, and a higher lr is
    #: refused by __init__; constrain_space narrows it further for other fixed bounds/scales
    search_space = {"lr": SearchDim("float", 1e-5, 1e-2, log=True),
                    "hyper_lr": SearchDim("float", 1e-3, 1.0, log=True)}
    default_rank = 4

    @classmethod
    def constrain_space(
        cls, space: dict[str, SearchDim], fixed: dict[str, Any]
    ) -> dict[str, SearchDim]:
        """MetaLR starts only when both initial rates, backbone_lr_scale·lr (backbone) and lr
        (head), lie in [lr_min, lr_max]; narrow the space so that every point does.

        Fixed values come from ``fixed`` (else the defaults). A searched ``backbone_lr_scale``,
        ``lr_min`` or ``lr_max`` counts at its worst case over its range (a box, since Optuna
        samples the dimensions independently): lr is narrowed to
        [max(lr_min, lr_min/scale_low), min(lr_max, lr_max/scale_high)] with lr_min at its
        highest and lr_max at its lowest. With ``lr`` not searched but given in ``fixed``, a
        searched ``backbone_lr_scale`` is narrowed instead. Raises :class:`SpaceError` naming
        the parameter to change when no valid point is left.
        """
        space = dict(space)
        fields = cls.Params.model_fields

        def narrow(low: float, high: float, ok: Callable[[float], bool]) -> tuple[float, float]:
            # a few ulps inwards until ``ok`` holds at both ends: the bounds come from divisions
            # whose rounding may put a product just outside [lr_min, lr_max]
            for _ in range(8):
                if ok(low) or low >= high:
                    break
                low = math.nextafter(low, math.inf)
            for _ in range(8):
                if ok(high) or high <= low:
                    break
                high = math.nextafter(high, -math.inf)
            return low, high

        def span(name: str) -> tuple[float, float]:
            dim = space.get(name)
            if dim is not None:
                return float(dim.low), float(dim.high)
            value = float(fixed.get(name, fields[name].default))
            return value, value

        searched = [n for n in ("backbone_lr_scale", "lr_min", "lr_max") if n in space]
        (_, lo_bound), (hi_bound, _) = span("lr_min"), span("lr_max")
        if lo_bound >= hi_bound:  # fixed values are checked by the config: a searched bound
            raise SpaceError(
                "lr_min" if "lr_min" in space else "lr_max",
                f"lr_min reaches {lo_bound:g} and lr_max goes down to {hi_bound:g}, but "
                "every sampled pair needs lr_min < lr_max; keep the lr_min range below the "
                "lr_max range",
            )
        s_lo, s_hi = span("backbone_lr_scale")
        if s_lo <= 0:
            raise SpaceError("backbone_lr_scale",
                             f"backbone_lr_scale must be > 0 (low={s_lo:g})")

        def fits(lr: float, scales: tuple[float, float]) -> bool:
            return all(lo_bound <= r <= hi_bound for r in (lr, scales[0] * lr, scales[1] * lr))

        where = (f"[lr_min, lr_max] = [{lo_bound:g}, {hi_bound:g}]"
                 + (" (worst case of the searched bounds)" if {"lr_min", "lr_max"} & set(space)
                    else ""))
        scale = (f"backbone_lr_scale {s_lo:g}" if s_lo == s_hi
                 else f"backbone_lr_scale searched in [{s_lo:g}, {s_hi:g}]")
        if "lr" in space:
            dim = space["lr"]
            need = (max(lo_bound, lo_bound / s_lo), min(hi_bound, hi_bound / s_hi))
            low, high = narrow(max(float(dim.low), need[0]),
                               min(float(dim.high), need[1]),
                               lambda lr: fits(lr, (s_lo, s_hi)))
            if not low < high:
                raise SpaceError(
                    searched[0] if searched else "lr",
                    f"no lr in [{dim.low:g}, {dim.high:g}] keeps both initial rates, "
                    f"backbone_lr_scale·lr and lr, inside {where} with {scale}: that needs "
                    f"{need[0]:g} <= lr <= {need[1]:g}; change backbone_lr_scale, "
                    "lr_min/lr_max or the lr range",
                )
            space["lr"] = dataclasses.replace(dim, low=low, high=high)
        elif fixed.get("lr") is not None:
            lr = float(fixed["lr"])
            if "backbone_lr_scale" in space:
                dim = space["backbone_lr_scale"]
                low, high = narrow(max(s_lo, lo_bound / lr), min(s_hi, hi_bound / lr),
                                   lambda s: lo_bound <= s * lr <= hi_bound)
                if not low < high:
                    raise SpaceError(
                        "backbone_lr_scale",
                        f"no backbone_lr_scale in [{s_lo:g}, {s_hi:g}] keeps the "
                        f"backbone's initial rate backbone_lr_scale·lr (lr={lr:g}) inside "
                        f"{where}: that needs {lo_bound / lr:g} <= backbone_lr_scale <= "
                        f"{hi_bound / lr:g}",
                    )
                space["backbone_lr_scale"] = dataclasses.replace(dim, low=low, high=high)
                s_lo, s_hi = low, high
            if not fits(lr, (s_lo, s_hi)):
                raise SpaceError(
                    next((n for n in searched if n != "backbone_lr_scale"), "lr"),
                    f"the initial rates {s_lo * lr:g} (backbone) and {lr:g} (head), "
                    f"from lr={lr:g}, lie outside {where}; change lr, backbone_lr_scale or "
                    "the bounds",
                )
        return space

    @classmethod
    def measured_cost_share(cls, params: BaseModel, batch_size: int) -> float:
        """The extra cost is one forward/backward on the meta batch every ``meta_interval``
        iterations; bench_throughput measures it at interval 1 with a full-size meta batch."""
        p: Any = params
        return (p.meta_batch_size / batch_size if p.meta_batch_size else 1.0) / p.meta_interval

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        p: MetaLRParams = self.params
        self.meta_source = p.meta_source
        self.meta_batch_size = p.meta_batch_size
        if p.optimizer is not None:
            self.settings = dataclasses.replace(settings, optimizer=p.optimizer)
        lr = self.settings.lr
        init = initial_rates(lr, p.backbone_lr_scale, len(groups))
        bad = [(g.name, a) for g, a in zip(groups, init, strict=True)
               if not p.lr_min <= a <= p.lr_max]
        if bad:
            raise ValueError(
                f"{self.name}: initial learning rates {', '.join(f'{n}={a:g}' for n, a in bad)} lie "
                f"outside [lr_min, lr_max] = [{p.lr_min:g}, {p.lr_max:g}]; change lr "
                f"({lr:g}), backbone_lr_scale or the bounds"
            )
        self.group_names = [g.name for g in groups]
        self.head_index = len(groups) - 1
        #: the first epochs whose head rate stays at lr (from head_pin_fraction/_epochs)
        self.head_pin = pinned_epochs(p.head_pin_fraction, p.head_pin_epochs,
                                      self.settings.epochs)
        self.head_pinned = False  # whether the last step held the head at lr (logged)
        #: which reference the meta batches follow (None: no meta-step)
        self.meta_reference = META_REFERENCE.get(p.meta_source) if self.learns_rates else None
        self._init = init
        self.alpha = torch.tensor(init, dtype=torch.float32)
        self.hypergrad = torch.zeros(len(groups))
        self.meta_loss = torch.full((), float("nan"))
        self.step = 0
        self._look: Lookahead | None = None
        self._views: list[torch.Tensor] = []
        self._hist: list[torch.Tensor] = []
        self._hist_steps: list[int] = []
        self._hist_every = 1

    # -- optimizer with the learned rates as device tensors ---------------------------------------
    def build_optimizer(self) -> torch.optim.Optimizer:
        device = next(self.model.parameters()).device
        self.alpha = self.alpha.to(device)
        self.hypergrad = self.hypergrad.to(device)
        self.meta_loss = self.meta_loss.to(device)
        self._views = list(self.alpha.unbind())
        self._look = Lookahead(self.model, self.groups)  # after the trainer moved the model
        groups = [self._group(i, lr=self._views[i]) for i in range(len(self.groups))]
        groups = [g for g in groups if g["params"]]
        s = self.settings
        # fused kernels take a device-tensor LR without a host sync; on CPU the plain loop reads
        # it as a number (no device to sync with)
        extra: dict[str, Any] = {"fused": True} if device.type == "cuda" else {"foreach": False}
        self.optimizer = create_optimizer(groups, s, s.optimizer, **extra)
        self._index = [self.group_names.index(g["name"]) for g in self.optimizer.param_groups]
        return self.optimizer

    # -- the step -----------------------------------------------------------------------------------
    def meta_update(self, ctx: StepContext) -> None:
        """Steps 1-2: look ahead with the current α, update α from the meta batch.

        Expects ``.grad`` to hold g = ∇L_train(θ). Leaves the parameters, their gradients and the
        BatchNorm running statistics untouched.
        """
        if ctx.meta_batch is None:
            raise RuntimeError(
                "metalr needs meta batches: run it through the Trainer (which reads "
                "strategy.meta_source) or pass StepContext.meta_batch"
            )
        p: MetaLRParams = self.params
        if self._look is None:
            self._look = Lookahead(self.model, self.groups)
        self._look.use_compile(ctx.compile)
        x_val, y_val = ctx.meta_batch()
        h, meta_loss = hypergradient(self._look, self.alpha, x_val, y_val, ctx.loss_fn,
                                     ctx.autocast)
        new = update_rates(self.alpha, h, rule=p.update, hyper_lr=p.hyper_lr, lr_min=p.lr_min,
                           lr_max=p.lr_max)
        self.alpha.copy_(new)  # in place: the optimizer's LR tensors are views of alpha
        self.hypergrad.copy_(h.to(self.hypergrad.dtype))
        self.meta_loss.copy_(meta_loss.float())

    def pin_head(self, epoch: int) -> None:
        self.head_pinned = epoch < self.head_pin
        if self.head_pinned:
            self.alpha[self.head_index] = self.settings.lr

    def train_step(
        self, ctx: StepContext, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        opt = ctx.optimizer
        loss = self.forward_backward(ctx, batch)  # g, reused by the look-ahead and the real step
        if self.learns_rates and self.step % self.params.meta_interval == 0:
            self.meta_update(ctx)
        self.pin_head(ctx.epoch)
        for g, i in zip(opt.param_groups, self._index, strict=True):
            g["lr"] = self._views[i]  # re-bind after an optimizer load_state_dict, cheap
        opt.step()
        self._record()
        self.step += 1
        return loss.detach()

    def _record(self) -> None:
        if self.step % self._hist_every:
            return
        self._hist.append(self.alpha.detach().clone())
        self._hist_steps.append(self.step)
        if len(self._hist) > _MAX_HISTORY:  # thin 2:1, keep sampling evenly
            self._hist, self._hist_steps = self._hist[::2], self._hist_steps[::2]
            self._hist_every *= 2

    # -- reporting ----------------------------------------------------------------------------------
    def log_values(self) -> dict[str, float]:
        """Every group's current LR, their spread, whether the head is pinned and the last
        hyper-gradient (one host sync)."""
        a = self.alpha.detach().cpu().tolist()
        out = {f"lr/{n}": v for n, v in zip(self.group_names, a, strict=True)}
        out |= lr_spread(a) | {"head_pinned": float(self.head_pinned)}
        if not self.learns_rates:
            return out
        h = self.hypergrad.detach().cpu().tolist()
        out |= {f"hypergrad/{n}": v for n, v in zip(self.group_names, h, strict=True)}
        meta = float(self.meta_loss)
        if meta == meta:  # not NaN: at least one meta-step happened
            out["meta_loss"] = meta
        return out

    def lr_history(self) -> tuple[list[int], np.ndarray]:
        """(iterations, rates [n, groups]) sampled during training, plus the current rates."""
        steps = list(self._hist_steps)
        rows = [t.cpu() for t in self._hist]
        if not steps or steps[-1] != self.step:
            steps.append(self.step)
            rows.append(self.alpha.detach().cpu())
        return steps, torch.stack(rows).double().numpy()

    def artifacts(self) -> dict[str, Any]:
        """Figures the runner logs to the run: the learned LR curves (paper's Fig. 4)."""
        # imported here: matplotlib loads only when the figure is drawn (end of a run)
        from metalr_bench.strategies.core.lr_curves import lr_curves_figure

        steps, rates = self.lr_history()
        return {"lr_curves.png": lr_curves_figure(steps, rates, self.group_names)}

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.detach().cpu().clone(),
            "hypergrad": self.hypergrad.detach().cpu().clone(),
            "meta_loss": self.meta_loss.detach().cpu().clone(),
            "step": self.step,
            "history": torch.stack([t.cpu() for t in self._hist]) if self._hist else None,
            "history_steps": list(self._hist_steps),
            "history_every": self._hist_every,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.alpha.copy_(state["alpha"])
            self.hypergrad.copy_(state["hypergrad"])
            self.meta_loss.copy_(state["meta_loss"])
        self.step = int(state["step"])
        hist = state.get("history")
        dev = self.alpha.device
        self._hist = [] if hist is None else [r.to(dev) for r in hist.unbind()]
        self._hist_steps = list(state.get("history_steps", []))
        self._hist_every = int(state.get("history_every", 1))

