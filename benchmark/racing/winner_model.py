"""The race's winner handed over as a model: its run's selected checkpoint logged as an MLflow
model with a signature, an input example and its preprocessing, and with ``--register``
registered in the MLflow Model Registry, tagged with the race's parent run."""

from __future__ import annotations

import logging
from typing import Any

from metalr_bench.benchmark.config import BenchmarkConfig, Cell
from metalr_bench.benchmark.racing.outcome import DatasetRace, race_metrics
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.benchmark.tracking.client import Tracker
from metalr_bench.benchmark.training import export
from metalr_bench.benchmark.training.cell import train_cell
from metalr_bench.benchmark.training.cell import trainer_settings as _trainer_settings
from metalr_bench.benchmark.tuning.race_study import (
    RaceSpec,
)

log = logging.getLogger(__name__)


# -- the model --------------------------------------------------------------------------------------
def log_winner_model(rcfg: BenchmarkConfig, race: DatasetRace, bundle: Any, weights: Any,
                     tracker: Tracker, parent: str, uri: str, register: str | None,
                     ) -> dict[str, Any]:
    """The winner's selected checkpoint as an MLflow model in a ``kind=model`` run under the
    race's run; registered as ``register`` (tag ``race_parent_run_id``) when given."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    winner = next(r for r in race.results if r.run_id == race.winner_run_id)
    eff = rcfg.effective(winner.cell)
    normalize = _trainer_settings(eff, seed=winner.cell.seed, epochs=1).normalize
    state = export.load_selected(rcfg.output_dir, winner.config_hash)
    retrained = state is None
    if retrained:  # a run FINISHED before without keeping it (e.g. by the plain grid): the same
        # cell trained again in this process, its checkpoint chosen on validation as always
        log.warning("race %s: the selected weights of run %s are not on disk; training the "
                    "winner's cell again for its model", race.dataset, winner.run_id)
        result = train_cell(rcfg, winner.cell, bundle, weights, [], artifacts=False)
        state = result.final_state
    assert state is not None
    model = export.serving_model(eff.model.arch, bundle, state, normalize)
    images, labels = export.split_inputs(bundle)
    metrics = export.evaluate(model, images, labels, bundle.task)
    pre = export.preprocessing(bundle, normalize)
    pre |= {"dataset": race.dataset, "strategy": winner.cell.strategy,
            "params": winner.cell.params, "overrides": winner.cell.overrides,
            "seed": winner.cell.seed, "model": eff.model.arch,
            "source_run_id": winner.run_id, "race_parent_run_id": parent}
    example = images[:2]
    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, out)
    tags = {T.KIND: T.KIND_MODEL, T.DATASET: race.dataset, T.STRATEGY: winner.cell.strategy,
            T.SEED: winner.cell.seed, T.MODEL: eff.model.arch, "source_run_id": winner.run_id,
            T.STUDY_NAME: race.study_name, "retrained": str(retrained).lower()}
    info: dict[str, Any] = {"retrained": retrained, "test_metrics": metrics}
    with tracker.run(f"{race.dataset}/{winner.cell.strategy}/model", tags,
                     parent_id=parent) as run_id:
        tracker.log_metrics(run_id, {f"test_{k}": v for k, v in metrics.items()})
        tracker.log_dict(run_id, pre, "preprocessing.json")
        before = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            with mlflow.start_run(run_id=run_id, experiment_id=tracker.experiment_id):
                logged = mlflow.pytorch.log_model(
                    model, name="model", signature=signature, input_example=example,
                    metadata={"preprocessing": pre}, pip_requirements=_requirements())
            info |= {"run_id": run_id, "model_uri": logged.model_uri,
                     "runs_uri": f"runs:/{run_id}/model"}
            if register:
                version = mlflow.register_model(logged.model_uri, register,
                                                tags={"race_parent_run_id": parent,
                                                      "dataset": race.dataset,
                                                      "strategy": winner.cell.strategy})
                info |= {"registered_name": register, "version": int(version.version),
                         "registry_uri": f"models:/{register}/{version.version}"}
                # what the version is, on its page in the UI (it used to be empty)
                mlflow.MlflowClient(uri).update_model_version(
                    register, version.version, description=model_description(
                        rcfg, race, winner.cell, metrics, info["registry_uri"], parent))
                tracker.set_tags(run_id, {"registered_model": f"{register}/{version.version}"})
        finally:
            mlflow.set_tracking_uri(before)
    return info


def model_description(rcfg: BenchmarkConfig, race: DatasetRace, cell: Cell,
                      metrics: dict[str, float], registry_uri: str, parent: str) -> str:
    """The registered version's description (Markdown, shown on its page in the MLflow UI):
    the dataset, the strategy and its parameters, how it was chosen, its test metric with the
    confirmation's 95 % interval over seeds, and how to load it."""
    metric, val_key, higher = race_metrics(rcfg)
    name = metric.removeprefix("test_")
    params = ", ".join(f"{k}={v}" for k, v in sorted(cell.params.items())) or "defaults"
    trials = sum(race.counts.values()) if race.counts else 0
    lines = [
        f"**{cell.strategy}** ({params}) fine-tuning **{rcfg.model.arch}** on "
        f"**{race.dataset}**, seed {cell.seed}.",
        "",
        f"How it was chosen: `run-benchmark race` (run {parent}) searched "
        f"{len(rcfg.strategies)} strategies in one Optuna study "
        f"({trials} trials, Hyperband-pruned on validation {rcfg.tune.metric}), confirmed the "
        f"top {len(race.confirmed)} ({', '.join(race.confirmed)}) on {len(rcfg.seeds)} seeds, "
        f"and kept the strategy with the {'highest' if higher else 'lowest'} mean validation "
        f"{val_key.removeprefix('best_val_')} and its seed with the best validation value. "
        "Test data played no part in the choice.",
        "",
    ]
    row = (race.table[race.table["strategy"] == cell.strategy]
           if not race.table.empty else race.table)
    if name in metrics:
        lines.append(f"Test {name} of this model: {metrics[name]:.3f}.")
    if not row.empty and f"{metric}_mean" in row:
        r = row.iloc[0]
        lines.append(f"Confirmation ({int(r['n_seeds'])} seeds): test {name} "
                     f"{r[f'{metric}_mean']:.3f}, 95 % CI [{r['ci_low']:.3f}, "
                     f"{r['ci_high']:.3f}] (t interval over seeds).")
    if race.tied:
        lines.append(f"Tied with the best on test: {', '.join(race.tied)}.")
    lines += [
        "",
        f"Load it: `mlflow.pytorch.load_model(\"{registry_uri}\")`; input float32 "
        f"(N, C, H, W) at the training image size, pixels scaled to [0, 1] (the normalisation "
        "is inside the model); output probabilities per class (see `preprocessing.json` and "
        "the model's metadata). Needs `metalr_bench` installed.",
    ]
    return "\n".join(lines)


def _requirements() -> list[str]:
    """Pinned torch (skips MLflow's slow inference of requirements); the model's classes come
    from this suite (``metalr_bench``), installed where it is loaded."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}"]


def registered_name(register: str | None, spec: RaceSpec, n_races: int) -> str | None:
    """``--register NAME``: NAME for a race of one dataset; ``NAME-<dataset>`` per dataset
    when the config races several (one model per dataset)."""
    if register is None or n_races == 1:
        return register
    return f"{register}-{spec.dataset.dataset_name}"

