"""A cell's identity: the grid (:class:`Cell`), what changes one cell's result
(:func:`cell_identity`) and everything derived from it (:func:`config_hash`, the logged params
:func:`cell_params`, the Optuna study names), so they cannot disagree.

``cell_identity`` is everything that changes one cell's result (dataset, size, split options,
model, weights, strategy + params, seed, ``RESULT_FIELDS``, code version and the fingerprint of
the code the cell depends on, :mod:`metalr_bench.benchmark.fingerprint`). The functions take the
config as their first argument; :class:`~metalr_bench.benchmark.config.schema.BenchmarkConfig`
exposes them as methods (``cfg.config_hash(cell)``). Changing what they compute changes every
existing run's hash (resume would re-run everything): keep it stable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from metalr_bench.benchmark import __version__
from metalr_bench.benchmark.config.errors import ConfigError
from metalr_bench.benchmark.fingerprint import code_fingerprint, shared_fingerprint

if TYPE_CHECKING:  # the schema imports this module (Cell); the types only, to avoid a cycle
    from metalr_bench.benchmark.config.schema import BenchmarkConfig, DatasetSpec

#: the package version, logged with every run; what invalidates resume when the code changes is
#: the cell's ``code_fingerprint`` (:mod:`metalr_bench.benchmark.fingerprint`), which needs no one to remember a bump
CODE_VERSION = __version__

#: config fields that change a cell's result, besides its dataset, model, strategy, params and
#: seed (see :meth:`BenchmarkConfig.cell_identity`)
RESULT_FIELDS = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "momentum",
                 "augment", "input_pipeline", "precise_bn", "selection_metric")

def controls() -> dict[str, str]:
    """Control -> the strategy it controls, as each strategy declares it (``Strategy.controls``:
    ``discriminative`` -> ``metalr``). In one tuned grid with both, the control gets no study
    of its own and runs at the controlled strategy's tuned parameters (``tuning.studies``), so
    the paired difference measures only what the controlled strategy adds (MetaLR's
    hyper-gradient). The pairing lives with the strategy, so a new control is one file."""
    from metalr_bench.strategies.core.registry import discover

    return {name: cls.controls for name, cls in discover().items() if cls.controls}


def tuned_controls(cfg: BenchmarkConfig) -> dict[str, str]:
    """The controls of ``cfg`` that take another strategy's tuned parameters: tuning on, both
    the control and the strategy it controls listed."""
    if not cfg.tune.enabled:
        return {}
    names = {s.name for s in cfg.strategies}
    return {c: of for c, of in controls().items() if c in names and of in names}


#: config fields a cell may override (tuning sets the base LR per strategy)
CELL_OVERRIDABLE = ("lr", "weight_decay", "momentum", "batch_size", "epochs")


def stable_hash(payload: Any) -> str:
    """sha256 of ``payload`` as sorted JSON (the same on every machine and run)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Cell:
    """One (dataset, strategy, params, seed) run of the grid."""

    dataset: DatasetSpec
    strategy: str
    params: dict[str, Any]
    seed: int
    #: config fields replaced for this cell only (e.g. the tuned ``lr``), see ``CELL_OVERRIDABLE``
    overrides: dict[str, Any] = field(default_factory=dict)
    #: the Optuna study whose best trial chose ``params``/``overrides`` (None: not tuned)
    study: str | None = None
    #: the strategy whose study chose them when that is another strategy's: ``discriminative``
    #: runs at ``metalr``'s tuned parameters when both are in one tuned grid (:func:`controls`)
    tuned_from: str | None = None

    @property
    def strategy_label(self) -> str:
        """``strategy``, ``strategy(k=2)`` when parameters were set, ``strategy(tuned)``; a
        tuned cell keeps the params that name a variant of the method (``Strategy.label_params``,
        e.g. ``bitfit(train_norm_scale=True,tuned)``), so two methods never share a label."""
        if self.study is not None:
            from metalr_bench.strategies.core.registry import get_strategy

            try:
                keep = get_strategy(self.strategy).label_params
            except KeyError:  # a name no longer registered: its label as it was
                keep = ()
            shown = "".join(f"{k}={self.params[k]}," for k in sorted(keep) if k in self.params)
            return f"{self.strategy}({shown}tuned)"
        if not self.params:
            return self.strategy
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.strategy}({inner})"


def cells(cfg: BenchmarkConfig) -> list[Cell]:
    """The grid, dataset-major then strategy, params and seed (stable order)."""
    return [
        Cell(dataset=d, strategy=s.name, params=p, seed=seed)
        for d in cfg.dataset_specs()
        for s in cfg.strategies
        for p in s.expand()
        for seed in cfg.seeds
    ]


def effective(cfg: BenchmarkConfig, cell: Cell) -> BenchmarkConfig:
    """This config with ``cell.overrides`` applied (idempotent; cfg when none)."""
    if not cell.overrides:
        return cfg
    bad = sorted(set(cell.overrides) - set(CELL_OVERRIDABLE))
    if bad:
        raise ConfigError(
            f"cell overrides {bad} are not allowed; a cell may override {CELL_OVERRIDABLE}"
        )
    return cfg.model_copy(update=cell.overrides)


def cell_identity(cfg: BenchmarkConfig, cell: Cell, *, tuned: Iterable[str] = ()) -> dict[str, Any]:
    """Everything that changes the result of ``cell``: the one definition behind
    :func:`config_hash` (resume, de-duplication), the Optuna study name
    (``tuning.studies.study_name``) and the params every run logs (:func:`cell_params`).

    ``tuned``: names a study searches (``lr`` or strategy params), left out because every
    trial sets them.
    """
    from metalr_bench.strategies.core.registry import get_strategy

    eff = effective(cfg, cell)
    tuned = set(tuned)
    strategy = get_strategy(cell.strategy)
    params = strategy.Params(**cell.params).model_dump(mode="json")
    return {
        "dataset": {**cell.dataset.model_dump(
            mode="json", exclude={"download", "root", "label"}
            # no own source: the identity of the cells from before datasets could have one
            | ({"pretrain"} if cell.dataset.pretrain is None else set())),
                    # the root is left out (moving the data keeps the cells), its name not:
                    # two image folders with the same options are two datasets
                    # key "label" (not "dataset_name"): the identity hashes of existing
                    # runs were computed with it
                    "label": cell.dataset.dataset_name},
        "model": eff.model.model_dump(mode="json"),
        "strategy": cell.strategy,
        "params": {k: v for k, v in params.items() if k not in tuned},
        "seed": cell.seed,
        **eff.model_dump(mode="json", include=set(RESULT_FIELDS) - tuned),
        "code_version": CODE_VERSION,
        "code_fingerprint": code_fingerprint(strategy),
        # only when set: every cell from before the schedule keeps its hash
        **({"lr_milestones": eff.lr_milestones, "lr_gamma": eff.lr_gamma}
           if eff.lr_milestones else {}),
    }


def config_hash(cfg: BenchmarkConfig, cell: Cell) -> str:
    """Hash of :func:`cell_identity`: tags the cell's MLflow run, resume looks it up."""
    payload = cell_identity(cfg, cell)
    if cell.overrides:
        payload["overrides"] = cell.overrides
    if cell.tuned_from:
        payload["tuned_from"] = cell.tuned_from
    return stable_hash(payload)[:16]


def cell_params(cfg: BenchmarkConfig, cell: Cell) -> dict[str, Any]:
    """The MLflow params of ``cell``'s run: :func:`cell_identity`, flat, under the names
    the README's filters and the reports use (``lr``, ``strategy.k``, ``image_size``)."""
    ident = cell_identity(cfg, cell)
    dataset, model = ident["dataset"], ident["model"]
    return {
        "dataset": dataset.pop("label"), "dataset.adapter": dataset.pop("name"),
        "image_size": dataset.pop("size"),
        **{f"dataset.{k}": v for k, v in dataset.items()},
        "strategy": cell.strategy, "seed": cell.seed,
        "model": model.pop("arch"), "weights": model.pop("weights"),
        **{f"model.{k}": v for k, v in model.items()},
        **{k: ident[k] for k in RESULT_FIELDS},
        **{k: ident[k] for k in ("lr_milestones", "lr_gamma") if k in ident},
        **{f"strategy.{k}": v for k, v in ident["params"].items()},
        "code_version": ident["code_version"],
        "code_fingerprint": ident["code_fingerprint"],
        "code_fingerprint.shared": shared_fingerprint(),
    }
