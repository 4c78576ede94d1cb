"""What `run-benchmark race` adds to a config (its flags, :class:`RaceSettings`), the config
the race runs (:func:`race_config`) and the checks that fail bad flags before anything runs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from metalr_bench.benchmark.config import BenchmarkConfig, ConfigError
from metalr_bench.benchmark.planning.plan import (
    StepTimings,
)

#: trials per strategy when ``--n-trials`` is not given (the grid spends ``tune.n_trials``,
#: 20 by default, on each)
TRIALS_PER_STRATEGY = 4
#: confirmation seeds when the config sets none
DEFAULT_SEEDS = [0, 1, 2, 3, 4]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class RaceError(ConfigError):
    """A race that cannot go on (bad settings, or no trial of a dataset completed)."""


@dataclass(frozen=True)
class RaceSettings:
    """What `run-benchmark race` adds to a config (flags, not config keys)."""

    n_trials: int | None = None  # per dataset; None: TRIALS_PER_STRATEGY per strategy
    top_k: int = 3
    min_epochs: int = 1  # Hyperband's smallest budget (epochs)
    register: str | None = None  # MLflow Model Registry name
    timings: StepTimings | None = None  # to price the full grid (else: the race's own s/iter)
    #: confirmation seeds; None: the config's when it sets them, else DEFAULT_SEEDS
    seeds: list[int] | None = None


def race_config(cfg: BenchmarkConfig, settings: RaceSettings) -> BenchmarkConfig:
    """``cfg`` as the race runs it: tuning on (its epochs, seed, metric, spaces), ``n_trials``
    trials in the one study, and 5 seeds unless the config (or ``--seeds``) sets them."""
    n = settings.n_trials or TRIALS_PER_STRATEGY * len(cfg.strategies)
    seeds = settings.seeds or (cfg.seeds if "seeds" in cfg.model_fields_set else DEFAULT_SEEDS)
    tune = cfg.tune.model_copy(update={"enabled": True, "n_trials": n, "pruner": "hyperband"})
    return cfg.model_copy(update={"tune": tune, "seeds": seeds})


def check_settings(cfg: BenchmarkConfig, s: RaceSettings) -> None:
    """Bad flags fail before anything runs, naming the flag, what it takes and what to do."""
    if len(cfg.strategies) < 2:
        names = ", ".join(x.name for x in cfg.strategies) or "none"
        raise RaceError(f"`strategies`: a race needs at least 2 strategies to choose between, "
                        f"got {len(cfg.strategies)} ({names}); name more with `--strategy`, or "
                        "tune and train one with `run-benchmark --tune --strategy NAME`")
    if s.n_trials is not None and s.n_trials < 1:
        raise RaceError(f"`--n-trials` {s.n_trials}: a race needs at least 1 trial; give e.g. "
                        f"{TRIALS_PER_STRATEGY * len(cfg.strategies)} ({TRIALS_PER_STRATEGY} per "
                        "strategy)")
    if s.top_k < 1:
        raise RaceError(f"`--top-k` {s.top_k}: confirm at least the best strategy (1 or more)")
    if s.min_epochs < 1:
        raise RaceError(f"`--min-epochs` {s.min_epochs}: Hyperband's smallest budget is at "
                        "least 1 epoch")
    epochs = cfg.tune.epochs or cfg.epochs
    if s.min_epochs > epochs:
        raise RaceError(f"`--min-epochs` {s.min_epochs} is more than a trial's {epochs} epoch(s) "
                        "(`tune.epochs`, else `epochs`); lower it or raise `--trial-epochs`")
    if s.register is not None:
        if not _NAME.match(s.register):
            raise RaceError(f"`--register` {s.register!r}: a model name of letters, digits, "
                            "`_`, `-` and `.` (at most 128), e.g. `--register pneumonia-pick`")
        uri = cfg.tracking_uri
        if "://" not in uri or uri.startswith("file:"):
            raise RaceError(f"`--register` needs the MLflow Model Registry, which a file store "
                            f"({uri}) does not have: use `--tracking-uri sqlite:///mlflow.db` or "
                            "a tracking server")

