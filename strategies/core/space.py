"""A strategy's search space: what Optuna may tune, declared next to the strategy's ``Params``.

Why with the strategy: a new strategy is one file, and a fair comparison needs every strategy
tuned over its own key knobs; the benchmark's tuning stage (``benchmark.tuning``) reads
``Strategy.search_space`` and applies the config's overrides, it lists no strategy itself.

``lr`` is the base learning rate (the config's ``lr``), tunable for every strategy; the other
names are fields of the strategy's ``Params``. ``high="groups"`` means "the number of layer
groups of the model" (last-k's ``k``), resolved against the real model before a study starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class SearchDim:
    type: Literal["float", "int"]
    low: float
    high: float | Literal["groups"]
    log: bool = False

    def suggest(self, trial: Any, name: str) -> float | int:
        """Ask an Optuna trial for a value (Optuna 5: keyword-only ``log``)."""
        assert not isinstance(self.high, str), "resolve() the search space first"
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        scale = " log" if self.log else ""
        return f"{self.type}[{self.low:g}, {self.high if isinstance(self.high, str) else f'{self.high:g}'}]{scale}"


#: the base learning rate's default range, shared by every built-in strategy
LR = SearchDim("float", 1e-5, 1e-1, log=True)

