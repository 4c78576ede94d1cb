"""The typed benchmark config (pydantic models): datasets x strategies (each with its
parameters) x seeds, as in benchopt, with the model, training, tuning and execution settings.

A list value in a strategy's parameters expands to several grid cells (``k: [1, 2]`` -> two
cells). Unknown keys and bad values are rejected with a message that names the field, the
allowed values and what to do. The grid and a cell's identity live in
:mod:`metalr_bench.benchmark.config.identity` (the methods here delegate to it); reading YAML
and CLI flags in :mod:`metalr_bench.benchmark.config.loading`.

The validators look strategies and datasets up in their registries inside the functions, on
purpose: discovery imports every strategy and adapter module (torch), which `--help` must not.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, Literal

from metalr_bench.benchmark.config import identity
from metalr_bench.benchmark.config.errors import ConfigError
from metalr_bench.benchmark.config.errors import explain as _explain
from metalr_bench.benchmark.config.identity import Cell
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    # no NaN/inf in any float: `--lr nan` used to read "should be less than or equal to 10"
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_dataset(name: str, options: dict[str, Any]) -> None:
    """A known adapter name, and options its options model accepts (ValueError otherwise)."""
    from metalr_bench.datasets.core.registry import available_datasets, get_entry

    names = available_datasets()
    if name not in names:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(names)}")
    try:
        get_entry(name).options(**options)
    except ValidationError as exc:
        raise ValueError(f"options of dataset {name!r}: {_explain(exc)}") from None


class DatasetSpec(_Strict):
    """One ``datasets:`` entry: the adapter that reads it (``adapter``), where its files are and
    at what size; how it is named is ``label`` / :attr:`dataset_name`.

    ``adapter`` was called ``name`` (which read as the dataset's name); ``name:`` still loads,
    with a one-line warning. Dumps keep the key ``name`` (``serialization_alias``), so the cell
    identity and config hash of every existing run, the logged ``config.json`` and the MLflow
    dataset inputs are exactly what they were.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              serialize_by_alias=True)

    adapter: str = Field(serialization_alias="name",
                         description="the adapter that reads this dataset (see `run-benchmark "
                         "list`), e.g. pneumoniamnist, imagefolder, csv")
    root: str | None = Field(None, description="folder holding the dataset files")
    size: int = Field(28, ge=8, le=1024, description="image side in pixels")
    download: bool = False
    allow_md5_mismatch: bool = False
    options: dict[str, Any] = Field(default_factory=dict, description="adapter options")
    hflip: bool | None = Field(
        None, description="horizontal flips in augmentation; None: the dataset's policy (off "
        "where class names carry left/right, e.g. OrganAMNIST's kidney-left/kidney-right)",
    )
    pretrain: PretrainSpec | None = Field(
        None, description="this dataset's own pre-training source, instead of `model.pretrain` "
        "(with `model.weights: pretrain`): a target must not pre-train on itself",
    )
    label: str | None = Field(
        None, min_length=1, pattern=r"^[^/@]+$",
        description="how runs, tags, leaderboards and reports name this dataset; default: the "
        "adapter's name (imagefolder/csv: the root folder's name); a cross-validation fold adds "
        "-fold<k>",
    )

    @model_validator(mode="before")
    @classmethod
    def _name_is_adapter(cls, data: Any) -> Any:
        """``name:`` (the old key) -> ``adapter``, with one warning line per entry."""
        if isinstance(data, dict) and "name" in data:
            if "adapter" in data:
                raise ValueError("give the dataset's adapter once: `adapter` (`name` is its "
                                 "old spelling); drop `name`")
            import warnings

            from metalr_bench.datasets.core.errors import DatasetWarning

            data = {("adapter" if k == "name" else k): v for k, v in data.items()}
            warnings.warn(f"datasets: `name: {data['adapter']}` is deprecated, write "
                          f"`adapter: {data['adapter']}` (the adapter that reads the dataset; "
                          "`label` names it)", DatasetWarning, stacklevel=2)
        return data

    @property
    def name(self) -> str:
        """The adapter, under its old attribute name (read-only; kept for callers)."""
        return self.adapter

    @property
    def cv_group(self) -> str:
        """The dataset's name without its fold (the tag ``cv_group`` of a fold's runs): the
        entry's ``label``, else the adapter's default name."""
        from metalr_bench.datasets.core.registry import get_entry

        return self.label or get_entry(self.adapter).default_name(self.root, self.options)

    @property
    def fold(self) -> int | None:
        fold = self.options.get("fold")
        return None if fold is None else int(fold)

    @property
    def dataset_name(self) -> str:
        """The dataset's name wherever it is shown (tag and param ``dataset``, run names,
        reports): ``cv_group``, and ``-fold<k>`` for a cross-validation fold, so folds and two
        image folders never merge."""
        return self.cv_group if self.fold is None else f"{self.cv_group}-fold{self.fold}"

    @property
    def dataset_key(self) -> str:
        """``<dataset name>@<size>`` (the reports' ``dataset_key``; a cell's, a study's and a
        race's task): the same dataset at two sizes is two tasks."""
        return f"{self.dataset_name}@{self.size}"

    def expand_folds(self) -> list[DatasetSpec]:
        """One entry per fold when the adapter's options give ``n_folds`` without ``fold``
        (k-fold cross-validation as a grid dimension), else ``[self]``."""
        from metalr_bench.datasets.core.registry import get_entry

        opts = get_entry(self.adapter).options(**self.options)
        n_folds = getattr(opts, "n_folds", None)
        if n_folds is None or getattr(opts, "fold", None) is not None:
            return [self]
        return [self.model_copy(update={"options": {**self.options, "fold": k}})
                for k in range(n_folds)]

    @model_validator(mode="after")
    def _known(self) -> DatasetSpec:
        _check_dataset(self.adapter, self.options)
        return self


class StrategySpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> StrategySpec:
        from metalr_bench.strategies.core.registry import available_strategies, get_strategy

        if self.name not in available_strategies():
            raise ValueError(
                f"unknown strategy {self.name!r}; available: {', '.join(available_strategies())}"
            )
        cls = get_strategy(self.name)
        for combo in self.expand():
            try:
                cls.Params(**combo)
            except ValidationError as exc:
                raise ValueError(f"params of strategy {self.name!r}: "
                                 f"{_explain(exc, sep=', ')}") from None
        return self

    def expand(self) -> list[dict[str, Any]]:
        """All parameter combinations (lists expand, scalars stay)."""
        keys = list(self.params)
        values = [v if isinstance(v, list) else [v] for v in self.params.values()]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


class PretrainSpec(_Strict):
    """The suite's own pre-training stage (``model.weights: pretrain``).

    Its source is a dataset entry like those under ``datasets`` (``dataset`` is its name): a
    MedMNIST file (``root``, ``download``, ``allow_md5_mismatch``), an ``imagefolder`` or
    ``csv`` (``root``, ``options``), the synthetic source domain, at ``size`` px (default: the
    size of each target dataset it starts).
    """

    dataset: str = Field("synthetic-source", description="source dataset (`run-benchmark list`)")
    root: str | None = Field(None, description="folder holding the source's files")
    size: int | None = Field(
        None, ge=8, le=1024, description="the source's image side in pixels; default: the size "
        "of the target dataset (one checkpoint per target size)",
    )
    download: bool = False
    allow_md5_mismatch: bool = False
    options: dict[str, Any] = Field(default_factory=dict, description="the source's adapter options")
    epochs: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(128, ge=2)

    @model_validator(mode="after")
    def _known(self) -> PretrainSpec:
        # the checks of a `datasets` entry, so a bad source fails with the config, not later
        _check_dataset(self.dataset, self.options)
        return self


class ModelSpec(_Strict):
    arch: str = Field("resnet18", description="a zoo model (`run-benchmark list`) or "
                      "timm:<name>, any timm model (e.g. timm:convnext_atto)")
    weights: str = Field(
        "pretrain", description="none | imagenet | pretrain | path to a .pt checkpoint"
    )
    keep_head: bool = Field(
        False, description="keep the checkpoint's classifier when its shape matches the task's "
        "(default: every cell starts from a freshly initialised head)",
    )
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)
    # the default list is zoo.USCL_HEAD_PREFIXES (config sits below models and cannot import
    # it; a test keeps the two equal)
    weights_mapping: Literal["names", "positional"] = Field(
        "names",
        description="how a checkpoint's tensors find the model's: by key name, or positional "
        "(a foreign wrapper's keys, e.g. USCL's features.*, paired in order after dropping "
        "drop_prefixes), as the public MetaLR code loads its USCL start",
    )
    drop_prefixes: list[str] = Field(
        default_factory=lambda: ["l1.", "l2.", "linear.", "fc", "classifier"],
        description="weights_mapping positional: checkpoint keys starting with one of these "
        "(a projection head, a classifier) are dropped before pairing; default: USCL's",
    )

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        # the zoo's registry owns the names (imported here, not at the top: it imports torch)
        from metalr_bench.benchmark.models.zoo import get_card

        get_card(v)
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if v in ("none", "imagenet", "pretrain") or v.endswith((".pt", ".pth", ".ckpt")):
            return v
        raise ValueError(
            f"weights={v!r}: expected none, imagenet, pretrain or a path ending in .pt/.pth/.ckpt"
        )

    @model_validator(mode="after")
    def _positional_needs_a_file(self) -> ModelSpec:
        if self.weights_mapping == "positional" and self.weights in ("none", "imagenet",
                                                                     "pretrain"):
            raise ValueError(
                f"weights_mapping=positional pairs a checkpoint file's tensors in order; "
                f"weights={self.weights!r} is not a file (give a .pt/.pth/.ckpt path)"
            )
        return self


class ReferenceSpec(_Strict):
    """A published result shown beside ours (``references:``): never ranked or tested with the
    benchmark's runs, because its protocol differs (``train_images``, ``weights``,
    ``selection`` say how, for the report's note)."""

    dataset: str = Field(min_length=1, description="the dataset's name as the grid names it, "
                         "e.g. pneumoniamnist")
    size: int = Field(ge=8, le=1024, description="image side in pixels the result was measured at")
    model: str = Field(min_length=1, description="e.g. ResNet-18")
    arch: str | None = Field(
        None, description="the zoo network this row's model is (`run-benchmark list`), e.g. "
        "resnet18_cifar for MedMNIST's 28-px 'ResNet-18 (28)': the report says whether our "
        "rows beside it ran that network or another one")
    metrics: dict[Literal["auc", "acc", "balanced_acc", "f1"], float] = Field(
        min_length=1, description="published test figures in [0, 1], e.g. {auc: 0.944, acc: 0.854}")
    citation: str = Field(min_length=1, description="paper, and the table the figures are from")
    train_images: int | str | None = Field(None, description="training images the paper used")
    weights: str | None = Field(None, description="its starting weights, e.g. random init")
    selection: str | None = Field(None, description="how its checkpoint was chosen")
    notes: str = ""

    @field_validator("metrics")
    @classmethod
    def _unit_interval(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not 0.0 <= x <= 1.0}
        if bad:
            raise ValueError(f"metric values are fractions in [0, 1] (write 85.4 % as 0.854), "
                             f"got {bad}")
        return v


def _dataset_default() -> list[DatasetSpec]:
    return [DatasetSpec(adapter="synthetic")]


def _strategy_default() -> list[StrategySpec]:
    from metalr_bench.strategies.core.registry import default_strategies

    return [StrategySpec(name=n) for n in default_strategies()]


class SearchDimSpec(_Strict):
    """A config override of one search dimension (any field left out keeps the default)."""

    type: Literal["float", "int"] | None = None
    low: float | None = None
    high: float | None = None
    log: bool | None = None


class TuneSpec(_Strict):
    """The ``tune:`` block: an Optuna study per (dataset, strategy) on validation data.

    Every strategy gets the same ``n_trials``, the same epochs and the same tuning seed, so
    the comparison that follows is fair. See :mod:`metalr_bench.benchmark.tuning.studies`.
    """

    enabled: bool = Field(False, description="tune before the final grid (`--tune`)")
    n_trials: int = Field(20, ge=1, description="trials per (dataset, strategy) study")
    epochs: int | None = Field(None, ge=1, description="epochs per trial (default: `epochs`)")
    seed: int = Field(0, description="the fixed training seed of every trial; also seeds the sampler")
    metric: Literal["auc", "acc", "balanced_acc", "f1", "val_loss"] = Field(
        "auc", description="validation objective: maximised, except val_loss (minimised)"
    )
    sampler: Literal["tpe", "gp", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = Field(
        2, ge=0, description="median pruner: trials that are never pruned"
    )
    storage: str | None = Field(
        None, description="None: optuna.db (serial) or optuna-journal.log (local/ray) next to "
        "the MLflow DB; an RDB URL; or a path ending in .log/.jsonl (JournalStorage file)",
    )
    timeout: float | None = Field(None, gt=0, description="seconds per study (optional)")
    workers_per_study: int = Field(
        1, ge=1, le=64, description="with executor local/ray: workers sharing each study "
        "(studies also run in parallel with each other)",
    )
    params: dict[str, dict[str, SearchDimSpec | None]] = Field(
        default_factory=dict,
        description="per-strategy search-space overrides, e.g. {l2sp: {alpha: {high: 10}}}; "
        "null drops a dimension (e.g. {full: {lr: null}} keeps lr fixed)",
    )

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is None or "://" in v or v.endswith((".log", ".jsonl")):
            return v
        raise ValueError(
            f"storage={v!r}: expected an RDB URL (sqlite:///optuna.db, postgresql://...) or a "
            "journal file path ending in .log or .jsonl"
        )




class BenchmarkConfig(_Strict):
    name: str = Field("quick", min_length=1, description="MLflow experiment name")
    datasets: list[DatasetSpec] = Field(default_factory=_dataset_default, min_length=1)
    strategies: list[StrategySpec] = Field(default_factory=_strategy_default, min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=2)
    eval_batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0, le=10)
    lr_milestones: list[int] = Field(
        default_factory=list, description="multi-step lr decay: at the start of each of these "
        "epochs (0-based, increasing) every rate is multiplied by lr_gamma, as torch's "
        "MultiStepLR stepped per epoch (MedMNIST v2: [50, 75] of 100 epochs); empty: no decay",
    )
    lr_gamma: float = Field(0.1, gt=0, le=1, description="the factor of each lr_milestones step")
    optimizer: str = Field("adam", description="a name of the optimizer registry "
                           "(strategies.core.optim): adam, adamw, sgd")
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    augment: bool = True
    input_pipeline: Literal["suite", "metalr_public", "metalr_public_crop"] = Field(
        "suite", description="suite: rotation/shift/scale + the dataset's flip policy, inputs "
        "normalised for the weights; metalr_public: the public MetaLR code's pipeline, "
        "RandomResizedCrop(scale 0.8-1, ratio 0.8-1.25) + the flip policy, mean 0.18 / std 0.24 "
        "(its ultrasound weights' statistics); metalr_public_crop: that crop with the weights' "
        "own normalisation (for every strategy)",
    )
    precise_bn: bool = Field(True, description="re-estimate BatchNorm statistics before evaluation")
    selection_metric: Literal["auc", "acc", "balanced_acc", "f1"] = "auc"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    log_every_n_steps: int = Field(0, ge=0)
    tracking_uri: str = "sqlite:///mlflow.db"
    output_dir: str = "benchmark-output"
    executor: Literal["serial", "local", "ray"] = Field(
        "serial", description="where cells run: this process, local worker processes, or Ray"
    )
    workers: int | None = Field(
        None, ge=1, description="local executor: worker processes (default: one per GPU)"
    )
    gpus_per_run: float = Field(
        1.0, gt=0, le=8, description="GPUs per cell (0.25 packs 4 small runs on one GPU)"
    )
    ray_address: str | None = Field(None, description="Ray cluster address, e.g. auto")
    force: bool = Field(False, description="re-run cells that already have a FINISHED run")
    deterministic: bool = Field(False, description="torch deterministic algorithms")
    tracking_retry_s: float = Field(
        60.0, ge=0, le=3600, description="how long to retry an unreachable tracking server"
    )
    system_metrics: bool = Field(
        True, description="log MLflow system metrics (CPU, memory, GPU) for every training run"
    )
    system_metrics_interval_s: float = Field(
        10.0, gt=0, le=3600, description="seconds between two system-metrics samples"
    )
    report: bool = Field(True, description="build the report notebook/HTML after the grid")
    min_effect: float = Field(
        0.005, ge=0, description="the smallest difference in the primary metric (e.g. 0.005 "
        "AUC) worth more seeds: the answer sizes the seeds a paired test needs to separate a "
        "tie from the best, and calls a tie closer than this too small to matter",
    )
    tune: TuneSpec = Field(default_factory=TuneSpec)
    references: list[ReferenceSpec] = Field(
        default_factory=list, description="published results shown beside ours in the report "
        "(never ranked or tested with them); an entry may be a YAML file of such rows, e.g. "
        "references/medmnist.yaml, relative to the config file",
    )

    @field_validator("datasets", mode="before")
    @classmethod
    def _dataset_shorthand(cls, v: Any) -> Any:
        return [{"adapter": d} if isinstance(d, str) else d for d in v] if isinstance(v, list) else v

    @field_validator("strategies", mode="before")
    @classmethod
    def _strategy_shorthand(cls, v: Any) -> Any:
        return [{"name": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, v: str) -> str:
        # the registry's names; imported here (the strategies package imports torch)
        from metalr_bench.strategies.core.optim import check_optimizer

        return check_optimizer(v)

    @field_validator("gpus_per_run")
    @classmethod
    def _gpu_fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"gpus_per_run={v}: fractions must be <= 1 (e.g. 0.25) or whole GPUs")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device={v!r}: expected auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _milestones(self) -> BenchmarkConfig:
        m = self.lr_milestones
        if any(b <= a for a, b in zip(m, m[1:], strict=False)) or any(x < 1 for x in m):
            raise ValueError(f"lr_milestones={m}: expected increasing epochs >= 1, e.g. [50, 75]")
        if m and m[-1] >= self.epochs:
            raise ValueError(f"lr_milestones={m}: {m[-1]} is not before the last epoch "
                             f"(epochs: {self.epochs}); use epochs below {self.epochs}")
        return self

    @model_validator(mode="after")
    def _own_pretrain_needs_pretrain(self) -> BenchmarkConfig:
        own = [d.dataset_name for d in self.datasets if d.pretrain is not None]
        if own and self.model.weights != "pretrain":
            raise ValueError(
                f"datasets {own} give their own `pretrain` source, which is used only with "
                f"`model.weights: pretrain` (got {self.model.weights!r}); drop it or set weights"
            )
        return self

    # -- resolution -------------------------------------------------------------------------------
    def pretrain_for(self, dataset: DatasetSpec) -> PretrainSpec:
        """The pre-training source of ``dataset``: its own ``pretrain``, else ``model.pretrain``."""
        return dataset.pretrain if dataset.pretrain is not None else self.model.pretrain

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"device={self.device!r} but no CUDA GPU is visible; use `--device cpu`"
            )
        return self.device

    def system_metrics_every(self) -> float | None:
        """The system-metrics sampling interval of a training run, None when they are off."""
        return self.system_metrics_interval_s if self.system_metrics else None

    def use_amp(self) -> bool:
        return self.amp == "bf16" or (self.amp == "auto" and self.resolved_device() != "cpu")

    def use_channels_last(self) -> bool:
        on = self.channels_last == "on"
        return on or (self.channels_last == "auto" and self.resolved_device() != "cpu")

    def dataset_specs(self) -> list[DatasetSpec]:
        """The datasets of the grid, cross-validation folds expanded (one entry per fold)."""
        return [f for d in self.datasets for f in d.expand_folds()]

    # -- the grid and a cell's identity (config.identity) ------------------------------------------
    def cells(self) -> list[Cell]:
        """The grid, dataset-major then strategy, params and seed (stable order)."""
        return identity.cells(self)

    def effective(self, cell: Cell) -> BenchmarkConfig:
        """This config with ``cell.overrides`` applied (idempotent; self when none)."""
        return identity.effective(self, cell)

    def cell_identity(self, cell: Cell, *, tuned: Iterable[str] = ()) -> dict[str, Any]:
        """Everything that changes the result of ``cell`` (:func:`.identity.cell_identity`)."""
        return identity.cell_identity(self, cell, tuned=tuned)

    def config_hash(self, cell: Cell) -> str:
        """Hash of :meth:`cell_identity`: tags the cell's MLflow run, resume looks it up."""
        return identity.config_hash(self, cell)

    def cell_params(self, cell: Cell) -> dict[str, Any]:
        """The MLflow params of ``cell``'s run (:func:`.identity.cell_params`)."""
        return identity.cell_params(self, cell)
