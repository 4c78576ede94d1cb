"""The epoch means a regulariser logs to show it acted: its penalty and the penalty's share of
the loss, ``penalty / (task loss + penalty)`` (``<name>/penalty``, ``<name>/penalty_share``).

Why a share: a penalty of 0.3 means nothing on its own; against a task loss of 0.1 it dominates
the gradient, against 30 it is noise. The penalty is the regularising term as it enters the loss
(its weight, α or η, included), so share and loss are in the same units.

Both sums stay on the device as detached tensors (no host sync in the training loop) and are
read once, when the epoch's values are logged.
"""

from __future__ import annotations

import torch


class PenaltyMeter:
    """Running sums of one epoch's penalties and task losses (reset with :meth:`reset`)."""

    def __init__(self, name: str, device: torch.device | str) -> None:
        self.name = name
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        #: penalty sum, penalty count, task-loss sum, task-loss count
        self._sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def add_penalty(self, penalty: torch.Tensor) -> None:
        """One step's weighted penalty (detached here)."""
        self._sums[0] += penalty.detach().to(torch.float64)
        self._sums[1] += 1

    def add_task_loss(self, loss: torch.Tensor) -> None:
        """One step's task loss (detached here)."""
        self._sums[2] += loss.detach().to(torch.float64)
        self._sums[3] += 1

    def values(self) -> dict[str, float]:
        """``<name>/penalty`` (epoch mean) and ``<name>/penalty_share`` = mean penalty / (mean
        task loss + mean penalty); the share is left out until a task loss was seen (a step
        run outside the trainer's loop), both until a penalty was."""
        pen, n_pen, task, n_task = self._sums.tolist()  # the one read of the epoch
        if n_pen == 0:
            return {}
        out = {f"{self.name}/penalty": pen / n_pen}
        if n_task:
            mean_pen, mean_task = pen / n_pen, task / n_task
            total = mean_task + mean_pen
            out[f"{self.name}/penalty_share"] = mean_pen / total if total > 0 else 0.0
        return out
