"""WiSE-FT (Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes, Hajishirzi, Farhadi,
Namkoong & Schmidt, CVPR 2022, "Robust fine-tuning of zero-shot models"): weight-space
ensembling of the starting model and the fine-tuned one,

    θ(α) = (1 − α)·θ₀ + α·θ₁,

θ₀ the model fine-tuning starts from (the pre-trained backbone with a converged linear-probe
head, the suite's probe, as the zero-shot head's analogue), θ₁ the fine-tuned model (the
selected checkpoint, ``full``'s fine-tuning), α ∈ [0, 1] chosen on validation data at the end of
training (``on_train_end``, before the test split is read). Every floating-point state entry is
interpolated; integer buffers are θ₁'s (α = 0 and 1 are θ₀ and θ₁ whole).

Defaults: α chosen over {0, 0.1, ..., 1}; ``alpha`` fixes it (the paper's 0.5). Tuned: the base
LR only, on the validation score of θ(α*), the interpolated model at the α it chooses (the model
the row reports; ``studies.objective_value``), not on the fine-tuned endpoint's best epoch.
α = 0 is θ₀ exactly: its own BatchNorm statistics, no re-estimation on the target (every other
α is measured after the trainer's PreciseBN re-estimation, as each epoch is). Logged once: ``wise_ft/alpha`` (the ``mechanism``), the validation curve over α and
``wise_ft_alpha.png``; the probe's ``wise_ft/probe_*`` numbers.

Deviation: θ₀'s head is a linear probe, not a zero-shot classifier. The selection rule, ties and
the probe: docs/strategies.md, section ``wise_ft``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from metalr_bench.strategies.core.base import EndContext, FitData, Strategy, register
from metalr_bench.strategies.core.probe import ProbeOwner
from metalr_bench.strategies.core.space import LR
from pydantic import BaseModel, ConfigDict, Field, field_validator

#: the α grid the paper sweeps
DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


class WiSEFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alphas: list[float] = Field(list(DEFAULT_GRID), min_length=1,
                                description="the α grid chosen from on validation")
    alpha: float | None = Field(None, ge=0, le=1, description="a fixed α instead of the "
                                "validation choice (the paper's default without held-out "
                                "data: 0.5)")
    probe_l2: float | None = Field(None, gt=0, description="θ₀'s linear probe: its L2 weight λ "
                                   "(null: chosen on the validation loss)")

    @field_validator("alphas")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not 0 <= a <= 1]
        if bad:
            raise ValueError(f"every α must lie in [0, 1]; got {bad}")
        return sorted(set(v))


def interpolate(theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """θ(α) = (1 − α)·θ₀ + α·θ₁ for every floating-point entry; integer entries from θ₁. The
    ends are the two models exactly: α = 0 is θ₀ (its integer buffers too), α = 1 is θ₁."""
    if alpha in (0, 1):
        return {k: v.clone() for k, v in (theta0 if alpha == 0 else theta1).items()}
    out = {}
    for k, t1 in theta1.items():
        t0 = theta0[k]
        out[k] = torch.lerp(t0, t1, alpha) if t1.is_floating_point() else t1.clone()
    return out


@register
class WiSEFT(ProbeOwner, Strategy):
    """WiSE-FT (Wortsman et al., CVPR 2022): θ(α) = (1−α)·θ₀ + α·θ₁ between the starting and
    the fine-tuned model, α chosen on validation from a grid."""

    name = "wise_ft"
    description = ("WiSE-FT (Wortsman et al., CVPR 2022): fine-tune, then θ(α) = (1−α)·θ₀ + α·θ₁ "
                   "with α chosen on validation from a grid")
    Params = WiSEFTParams
    test_params = [{"alphas": [0.0, 0.5, 1.0]}, {"alpha": 0.5, "probe_l2": 1e-3}]
    search_space = {"lr": LR}
    mechanism = "wise_ft/alpha"

    def __init__(self, params, model, groups, settings) -> None:
        super().__init__(params, model, groups, settings)
        self._head = next(n for n, m in model.named_modules() if m is self.probe_linear)
        #: θ₀: the weights fine-tuning starts from (on the model's device); its head becomes
        #: the probe's in ``before_fit`` (or ``load_state_dict`` on resume)
        self.theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        #: α -> validation numbers, filled at the end of training
        self.curve: dict[float, dict[str, float]] = {}
        self.chosen: float | None = None
        self.selection_metric = ""

    def before_fit(self, data: FitData) -> None:
        """θ₀'s head: the converged probe, written into the model before the first update."""
        super().before_fit(data)
        self._probe_into_theta0()

    def _probe_into_theta0(self) -> None:
        assert self.probe is not None
        w = self.theta0[f"{self._head}.weight"]
        b = self.theta0[f"{self._head}.bias"]
        w.copy_(self.probe.weight.to(w))
        b.copy_(self.probe.bias.to(b))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The probe (:class:`ProbeOwner`); θ₀ is the start state with the probe's head,
        rebuilt from it on resume."""
        super().load_state_dict(state)
        if self.probe is not None:
            self._probe_into_theta0()

    @torch.no_grad()
    def on_train_end(self, ctx: EndContext) -> dict[str, float]:
        """The α sweep (each θ(α) measured on validation, BatchNorm re-estimated), timed as a
        one-off cost (``oneoff_time_s/alpha_sweep``)."""
        with self.one_off("alpha_sweep"):
            return self._sweep(ctx)

    def _sweep(self, ctx: EndContext) -> dict[str, float]:
        theta1 = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        p: WiSEFTParams = self.params
        grid = [p.alpha] if p.alpha is not None else p.alphas
        self.selection_metric = ctx.selection_metric
        self.curve = {}
        for a in grid:
            ctx.model.load_state_dict(interpolate(self.theta0, theta1, a))
            self.curve[a] = self._evaluate(ctx, a)
        self.chosen = max(grid, key=lambda a: self._score(self.curve[a], a))
        ctx.model.load_state_dict(interpolate(self.theta0, theta1, self.chosen))
        if len(grid) > 1:  # re-estimated BatchNorm statistics of θ(α*), as measured
            return self._evaluate(ctx, self.chosen)
        return self.curve[self.chosen]

    @staticmethod
    def _evaluate(ctx: EndContext, alpha: float) -> dict[str, float]:
        """θ(α)'s validation numbers. α = 0 is the starting model exactly: its BatchNorm
        statistics are θ₀'s own (the ones its probe head was fitted on), not re-estimated on
        the target; every other α gets the trainer's PreciseBN re-estimation, as each epoch."""
        if alpha == 0 and ctx.evaluate_val_as_is is not None:
            return ctx.evaluate_val_as_is()
        return ctx.evaluate_val()

    def _score(self, val: dict[str, float], alpha: float) -> tuple[float, float, float]:
        """Higher is better: the selection metric (NaN counts as worst), then the lower loss,
        then the smaller α."""
        m = val.get(self.selection_metric, math.nan)
        return (-math.inf if math.isnan(m) else m, -val["loss"], -alpha)

    def final_values(self) -> dict[str, float]:
        if self.chosen is None:
            return {}
        out = {"wise_ft/alpha": self.chosen}
        for a, val in self.curve.items():
            for key in (self.selection_metric, "loss"):
                if key in val:
                    out[f"wise_ft/val_{key}/alpha_{a:g}"] = val[key]
        return out

    def artifacts(self) -> dict[str, Any]:
        """The validation curve over α, the chosen α marked."""
        if self.chosen is None or len(self.curve) < 2:
            return {}
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        alphas = sorted(self.curve)
        fig, ax = plt.subplots(figsize=(4.5, 3))
        key = self.selection_metric
        ax.plot(alphas, [self.curve[a].get(key, math.nan) for a in alphas], marker="o")
        ax.axvline(self.chosen, color="grey", linestyle="--", label=f"chosen α = {self.chosen:g}")
        ax.set_xlabel("α  (0: starting model θ₀, 1: fine-tuned θ₁)")
        ax.set_ylabel(f"validation {key}")
        ax.set_title("WiSE-FT: θ(α) = (1 − α)·θ₀ + α·θ₁")
        ax.legend()
        fig.tight_layout()
        return {"wise_ft_alpha.png": fig}
