"""Read a benchmark back from MLflow as tidy tables: the report's only data source.

Why MLflow and never in-memory state: a report must be reproducible at any time from the store
alone (``run-benchmark report --experiment NAME``), on another machine, after the benchmark
process is long gone. Everything here goes through :class:`mlflow.MlflowClient` with an explicit
tracking URI, so nothing depends on a process-global active run.

Tables:

* :func:`results_table`: one row per child run (cell) of the chosen parent run(s): tags, params,
  final metrics; pre-training runs (tag ``stage=pretrain``) are left out;
* :func:`metric_histories`: long format ``run_id, key, step, value`` for per-epoch metrics,
  including the learning rate per layer group (``lr/<group>``);
* :func:`drift_table`: final ``drift/<group>`` per run, long format.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from metalr_bench.benchmark.tracking import tags as T
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

#: tags every child run carries (see ``benchmark.runner.cell_tags``)
CELL_TAGS = ("dataset", "image_size", "strategy", "strategy_label", "seed", "model",
             "config_hash", T.FOLD, T.CV_GROUP, T.MECHANISM, T.CODE_FINGERPRINT,
             T.CODE_FINGERPRINT_SHARED, T.TUNED, T.TUNED_FROM)
#: per-epoch metrics the report plots (besides ``lr/<group>``)
CURVE_METRICS = ("train_loss", "val_loss", "val_auc", "val_acc", "val_balanced_acc", "val_f1",
                 "epoch_time_s")
TEST_METRICS = ("test_auc", "test_acc", "test_balanced_acc", "test_f1")


class ReportDataError(LookupError):
    """The store has nothing to report on (no experiment, no parent run, no child runs)."""


@dataclass
class BenchmarkRuns:
    """The parent run(s) chosen for a report and their child runs."""

    experiment_id: str
    experiment_name: str
    parents: list[Run]
    children: list[Run]

    @property
    def parent_ids(self) -> list[str]:
        return [p.info.run_id for p in self.parents]


def _client(tracking_uri: str | MlflowClient) -> MlflowClient:
    return tracking_uri if isinstance(tracking_uri, MlflowClient) else MlflowClient(tracking_uri)


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str = "",
                order_by: list[str] | None = None) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string,
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_parents(client: MlflowClient, experiment_id: str,
                 parent_run_ids: Sequence[str] | None = None) -> list[Run]:
    """The given parent runs, or the most recent benchmark parent run (tag ``kind=benchmark``)."""
    if parent_run_ids:
        from mlflow.exceptions import MlflowException

        runs = []
        for r in parent_run_ids:
            try:
                runs.append(client.get_run(r))
            except MlflowException:  # used to escape as a traceback
                raise ReportDataError(
                    f"`--parent-run-id` {r}: no such run at {client.tracking_uri}; leave the "
                    "flag out for the latest benchmark, or copy a parent run's id from the "
                    "MLflow UI (tag kind=benchmark)") from None
        return runs
    latest = client.search_runs([experiment_id], filter_string="tags.kind = 'benchmark'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not latest:
        raise ReportDataError(
            f"experiment {experiment_id} has no benchmark parent run (tag kind=benchmark); "
            "run `run-benchmark` first or pass --parent-run-id"
        )
    return [latest[0]]


def load_runs(tracking_uri: str | MlflowClient, experiment: str,
              parent_run_ids: str | Sequence[str] | None = None) -> BenchmarkRuns:
    """Parent run(s) of ``experiment`` and their finished-or-not child runs (no pretrain runs).

    ``parent_run_ids``: None (latest benchmark run), one id, a comma-separated string or a list.
    """
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ReportDataError(
            f"no MLflow experiment named {experiment!r} at {client.tracking_uri}; "
            f"existing: {', '.join(names) or '(none)'}"
        )
    if isinstance(parent_run_ids, str):
        parent_run_ids = [p.strip() for p in parent_run_ids.split(",") if p.strip()]
    parents = find_parents(client, exp.experiment_id, parent_run_ids)
    children: list[Run] = []
    for p in parents:
        found = _search_all(client, exp.experiment_id,
                            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{p.info.run_id}'",
                            order_by=["attributes.start_time ASC"])
        # result runs only: a study run or a race's model run names a strategy too (the model's
        # run logs its cell's test metrics again); runs older than the ``kind`` tag are cells
        children += [r for r in found if not T.is_pretrain(r.data.tags)
                     and "strategy" in r.data.tags
                     and r.data.tags.get(T.KIND, T.KIND_CELL) == T.KIND_CELL]
    return BenchmarkRuns(exp.experiment_id, exp.name, parents, children)


def pretraining_table(tracking_uri: str | MlflowClient, runs: BenchmarkRuns) -> pd.DataFrame:
    """What each start is worth: the experiment's finished pre-training runs (``kind=pretrain``),
    one per checkpoint (``pretrain_key``, the latest), with the source, the architecture, its
    accuracy and AUC on the *source's own* test split (``test_acc``/``test_auc``, which the
    pre-training logs) and its cost (``total_time_s``). A cached checkpoint trained under an
    earlier benchmark run of the same experiment is found too. Empty when none."""
    client = _client(tracking_uri)
    rows: dict[str, dict[str, Any]] = {}
    found = _search_all(client, runs.experiment_id, f"tags.`{T.KIND}` = '{T.KIND_PRETRAIN}'",
                        order_by=["attributes.start_time ASC"])
    for r in found:
        if r.info.status != "FINISHED":
            continue
        m, p, tags = r.data.metrics, r.data.params, r.data.tags
        rows[tags.get("pretrain_key", r.info.run_id)] = {
            "source": tags.get(T.DATASET, p.get("dataset", "?")),
            "model": tags.get(T.MODEL, p.get("arch", "?")), "size": p.get("size"),
            "epochs": p.get("epochs"), "test_acc": m.get("test_acc"),
            "test_auc": m.get("test_auc"), "seconds": m.get("total_time_s"),
            "run_id": r.info.run_id,
        }
    return pd.DataFrame(list(rows.values()),
                        columns=["source", "model", "size", "epochs", "test_acc", "test_auc",
                                 "seconds", "run_id"])


def pretraining_markdown(table: pd.DataFrame) -> str:
    """One line per start for the report's header; empty when the runs started from none."""
    if table.empty:
        return ""
    def fmt(v: Any, spec: str) -> str:
        return "?" if v is None or pd.isna(v) else format(v, spec)
    lines = [f"`{r.model}` pre-trained on **{r.source}** ({r.size} px, {r.epochs} epoch(s)): "
             f"test accuracy **{fmt(r.test_acc, '.3f')}** on the source's own test split "
             f"(AUC {fmt(r.test_auc, '.3f')}), {fmt(r.seconds, '.0f')} s"
             for r in table.itertuples()]
    return "**What the start is worth** (the pre-training's own test figures):\n\n- " + \
        "\n- ".join(lines)


def race_notes(runs: BenchmarkRuns) -> dict[str, str]:
    """Per dataset key, what a race spent (the sentence its parent run carries in tag
    :data:`tags.RACE_COMPUTE`), for the parents that are races (``run-benchmark race``); empty
    for a grid."""
    notes: dict[str, str] = {}
    for p in runs.parents:
        raw = p.data.tags.get(T.RACE_COMPUTE)
        if p.data.tags.get(T.KIND) == T.KIND_RACE and raw:
            notes |= {str(k): str(v) for k, v in json.loads(raw).items()}
    return notes


def _as_number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def results_table(runs: BenchmarkRuns) -> pd.DataFrame:
    """One row per child run: ids, cell tags, ``dataset_key``, params (``param.<name>``), metrics.

    ``dataset_key`` is ``<dataset>@<image_size>``: the same dataset at two sizes is two tasks.
    """
    rows = []
    for r in runs.children:
        tags = r.data.tags
        row: dict[str, Any] = {
            "run_id": r.info.run_id,
            "run_name": tags.get(MLFLOW_RUN_NAME, r.info.run_name),
            "parent_run_id": tags.get(MLFLOW_PARENT_RUN_ID),
            "status": r.info.status,
            "start_time": pd.Timestamp(r.info.start_time, unit="ms", tz="UTC"),
        }
        for t in CELL_TAGS:
            row[t] = tags.get(t)
        row["seed"] = int(row["seed"]) if row["seed"] is not None else None
        row["image_size"] = int(row["image_size"]) if row["image_size"] is not None else None
        row["strategy_label"] = row["strategy_label"] or row["strategy"]
        row["dataset_key"] = f"{row['dataset']}@{row['image_size']}"
        # cross-validation: a fold is a dataset of its own (dataset_key), and all folds of one
        # dataset share cv_key, where the report pools them
        row["fold"] = int(row["fold"]) if row["fold"] is not None else None
        row["cv_key"] = (f"{row['cv_group']}@{row['image_size']}"
                         if row["cv_group"] is not None else None)
        row |= {f"param.{k}": _as_number(v) if k.startswith("strategy.") else v
                for k, v in sorted(r.data.params.items())}
        row |= {k: v for k, v in sorted(r.data.metrics.items())
                if not k.startswith(("step/", "lr/"))}
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for column in [c for c in df if c.startswith("param.strategy.")]:
        # two strategies may share a param name with values of other types (metalr's hyper_lr
        # is a number, hd's may be None): one type per column, or Parquet refuses the table
        kinds = {isinstance(v, int | float) for v in df[column].dropna()}
        if len(kinds) > 1:
            df[column] = [None if pd.isna(v) else str(v) for v in df[column]]
    return df.sort_values(["dataset_key", "strategy_label", "seed"], kind="stable",
                          ignore_index=True)


def test_predictions(tracking_uri: str | MlflowClient, results: pd.DataFrame) -> pd.DataFrame:
    """The test-set predictions each run of ``results`` logged (``predictions/test.csv``), one
    row per image with its ``run_id``; runs of older versions, which logged none, are absent."""
    client = _client(tracking_uri)
    frames = []
    with tempfile.TemporaryDirectory(prefix="metalr-preds-") as tmp:
        for run_id in results["run_id"]:
            try:
                path = client.download_artifacts(run_id, T.PREDICTIONS_ARTIFACT, tmp)
            except Exception:  # noqa: BLE001 - an older run without the artifact
                continue
            frame = pd.read_csv(path)
            frame.insert(0, "run_id", run_id)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


SYSTEM_MEMORY = "system/system_memory_usage_megabytes"


def with_peak_memory(tracking_uri: str | MlflowClient, results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with ``peak_memory_mb`` read from MLflow's system metrics where a run has
    them: the largest sample of ``system/system_memory_usage_megabytes`` (the host's memory in
    use while the run trained, as MLflow measures it with psutil), else the run's own
    ``peak_memory_mb`` (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS). The
    column ``peak_memory_source`` says which one each row holds."""
    client = _client(tracking_uri)
    out = results.copy()
    sources = []
    peaks = []
    for i, run_id in enumerate(out["run_id"]):
        history = client.get_metric_history(run_id, SYSTEM_MEMORY) if run_id else []
        if history:
            peaks.append(max(m.value for m in history))
            sources.append(SYSTEM_MEMORY)
        else:
            peaks.append(out["peak_memory_mb"].iloc[i] if "peak_memory_mb" in out else float("nan"))
            sources.append("peak_memory_mb")
    out["peak_memory_mb"] = peaks
    out["peak_memory_source"] = sources
    return out


def metric_histories(tracking_uri: str | MlflowClient, runs: BenchmarkRuns,
                     keys: Iterable[str] = CURVE_METRICS, *, lr: bool = True) -> pd.DataFrame:
    """Per-epoch values, long format: ``run_id, key, step, value`` (+ ``lr/<group>`` if ``lr``)."""
    client = _client(tracking_uri)
    wanted = set(keys)
    rows = []
    for r in runs.children:
        names = [k for k in r.data.metrics if k in wanted or (lr and k.startswith("lr/"))]
        for key in sorted(names):
            for m in client.get_metric_history(r.info.run_id, key):
                rows.append((r.info.run_id, key, m.step, m.value))
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def drift_table(results: pd.DataFrame) -> pd.DataFrame:
    """Long format ``run_id, group, drift`` from the final ``drift/<group>`` metrics."""
    cols = [c for c in results.columns if c.startswith("drift/")]
    if results.empty or not cols:
        return pd.DataFrame(columns=["run_id", "group", "drift"])
    long = results.melt(id_vars=["run_id"], value_vars=cols, var_name="group", value_name="drift")
    long["group"] = long["group"].str.removeprefix("drift/")
    return long.dropna(subset=["drift"])


def with_cell(table: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Join the cell columns (dataset_key, strategy_label, seed) onto a run_id-keyed table."""
    return table.merge(results[["run_id", "dataset_key", "strategy_label", "strategy", "seed"]],
                       on="run_id", how="inner")


def _group_key(name: str) -> tuple[int, tuple[int, ...], str]:
    """stem first, head last, numbered groups in number order (layer1.0 < layer1.1 < layer2.0;
    denseblock1 < transition1 < denseblock2): the input -> output order of ``layer_groups``."""
    nums = tuple(int(n) for n in re.findall(r"\d+", name))
    return (0 if name == "stem" else 2 if name == "head" else 1, nums, name)


def group_order(results: pd.DataFrame) -> list[str]:
    """Layer groups from input to output, from the ``drift/<group>`` columns."""
    return sorted((c.removeprefix("drift/") for c in results.columns if c.startswith("drift/")),
                  key=_group_key)


def find_studies(tracking_uri: str | MlflowClient, experiment_id: str) -> list[dict[str, str]]:
    """Optuna studies recorded on runs of the experiment (tags ``optuna.study_name/storage``)."""
    client = _client(tracking_uri)
    out, seen = [], set()
    for r in _search_all(client, experiment_id, "tags.`optuna.study_name` LIKE '%'"):
        name, storage = r.data.tags.get("optuna.study_name"), r.data.tags.get("optuna.storage")
        if name and storage and (name, storage) not in seen:
            seen.add((name, storage))
            out.append({"study_name": name, "storage": storage, "run_id": r.info.run_id})
    return out


def parent_provenance(tracking_uri: str | MlflowClient, runs: BenchmarkRuns) -> dict[str, Any]:
    """Tags, params and ``config.json`` of the (first) parent run."""
    client = _client(tracking_uri)
    parent = runs.parents[0]
    config: dict[str, Any] | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(parent.info.run_id, "config.json", tmp)
            with open(path) as fh:
                config = json.load(fh)
    except Exception:  # noqa: BLE001 - an old run without the artifact is still reportable
        config = None
    return {
        "run_id": parent.info.run_id,
        "run_name": parent.info.run_name,
        "status": parent.info.status,
        "start_time": pd.Timestamp(parent.info.start_time, unit="ms", tz="UTC"),
        "end_time": (pd.Timestamp(parent.info.end_time, unit="ms", tz="UTC")
                     if parent.info.end_time else None),
        "tags": {k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.log")},
        "params": dict(parent.data.params),
        "config": config,
    }
