"""`run-benchmark race`: one study across strategies, confirmation on seeds, the model registered."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import optuna
import pytest
import torch
from metalr_bench.benchmark.cli import main
from metalr_bench.benchmark.config import Cell, load_config, validate_config
from metalr_bench.benchmark.racing.orchestration import run_race
from metalr_bench.benchmark.racing.settings import (
    RaceError,
    RaceSettings,
    check_settings,
    race_config,
)
from metalr_bench.benchmark.training.cell import DataCache
from metalr_bench.benchmark.training.metrics import compute_metrics
from metalr_bench.benchmark.tuning import race_study
from metalr_bench.benchmark.tuning import studies as tuning
from metalr_bench.strategies.core.base import STRATEGIES, Strategy
from mlflow import MlflowClient
from optuna.trial import TrialState
from test_tuning import ListHandler

ROOT = Path(__file__).resolve().parents[1]


class Inverted(Strategy):
    """Deliberately crippled: fine-tunes every layer on shifted labels (class c trained as
    c + 1), so it learns a wrong mapping (validation AUC below 0.5)."""

    name = "inverted"

    def train_step(self, ctx, batch):
        x, y = batch
        ctx.optimizer.zero_grad(set_to_none=True)
        forward = ctx.model if ctx.forward is None else ctx.forward
        with ctx.autocast():
            logits = forward(x)
            loss = ctx.loss_fn(logits, (y + 1) % logits.shape[1])
        loss.backward()
        ctx.optimizer.step()
        return loss.detach()


@contextlib.contextmanager
def inverted_registered() -> Iterator[None]:
    STRATEGIES[Inverted.name] = Inverted
    try:
        yield
    finally:
        STRATEGIES.pop(Inverted.name, None)


def race_data(tiny: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Two strategies, one clearly best, on the easy 4-class synthetic source domain (the
    lesion task does not learn from scratch in 2 epochs); 2-epoch trials, 1-epoch runs."""
    return {**tiny, "datasets": [{"adapter": "synthetic-source", "size": 16,
                                  "options": {"n_images": 200}}],
            "strategies": ["full", "inverted"], "seeds": [0, 1], "epochs": 1,
            "batch_size": 32, "precise_bn": False, "system_metrics": False,
            "tune": {"epochs": 2, "params": {"full": {"lr": {"low": 1e-3, "high": 1e-2}},
                                             "inverted": {"lr": {"low": 1e-3, "high": 1e-2}}}},
            **extra}


def test_race_picks_the_clearly_best_strategy_registers_it_and_the_model_reproduces_its_test_metric(
    tiny_config: dict[str, Any],
) -> None:
    optuna.logging.set_verbosity(optuna.logging.INFO)  # Optuna's default, whatever ran before
    said = ListHandler()  # what Optuna's own stderr handler would print
    logging.getLogger("optuna").addHandler(said)
    with inverted_registered():
        cfg = validate_config(race_data(tiny_config))
        settings = RaceSettings(n_trials=4, top_k=2, register="race-pick")
        outcome = run_race(cfg, settings, progress=False)
    logging.getLogger("optuna").removeHandler(said)
    assert not outcome.failed, outcome.failed
    # quiet without a bar too (--no-progress): no Optuna INFO line per study and trial
    assert not [m for m in said.messages if "study created" in m or "finished with" in m], \
        said.messages[:3]
    (race,) = outcome.races
    assert race.board[0].strategy == "full"  # the search ranks it first on validation
    assert race.winner == "full" and race.best_on_test == "full"
    assert "(a race)" in race.answer[0] and "`full` is best" in race.answer[0]
    assert "training iterations" in race.answer[-1] and "full grid" in race.answer[-1]
    rcfg = race_config(cfg, settings)
    assert rcfg.seeds == [0, 1] and rcfg.tune.n_trials == 4  # the config's seeds, given

    # the search: one study, every trial one MLflow child run of the study's run
    study = optuna.load_study(study_name=race.study_name, storage=tuning.storage_url(rcfg))
    trials = study.get_trials()
    assert len(trials) == 4 and {t.params["strategy"] for t in trials} <= {"full", "inverted"}
    assert all(set(t.params) - {"strategy"} == {f"{t.params['strategy']}.lr"} for t in trials)
    client = MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_kind: dict[str, list[Any]] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags["kind"], []).append(r)
    (parent,) = by_kind["race"]
    assert parent.info.run_id == outcome.parent_run_id
    (study_run,) = by_kind["study"]
    assert study_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert len(by_kind["trial"]) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == study_run.info.run_id
               for r in by_kind["trial"])
    # the confirmation: ordinary cells of the confirmed strategies on every seed
    cells = by_kind["cell"]
    assert len(cells) == 2 * len(race.confirmed)
    assert {r.data.tags["optuna.study_name"] for r in cells} == {race.study_name}
    assert all("test_auc" in r.data.metrics for r in cells)
    assert race.compute is not None and 0 < race.compute.race_iters < race.compute.grid_iters
    summary = json.loads(outcome.summary_path.read_text())
    assert summary["datasets"][0]["winner"]["strategy"] == "full"
    assert summary["datasets"][0]["compute"]["share_iters"] < 1
    assert parent.data.tags["race.winner.synthetic-source_16"] == "full"
    # the report of the race's run: its rows are the confirmation cells (not the model's run,
    # which logs the winner's test metrics again), its answer is marked as a race with the
    # compute sentence
    from metalr_bench.reports.answer import the_answer
    from metalr_bench.reports.results import load_runs, race_notes, results_table

    report_runs = load_runs(cfg.tracking_uri, cfg.name, outcome.parent_run_id)
    rows = results_table(report_runs)
    assert sorted(rows["run_id"]) == sorted(r.info.run_id for r in cells)
    notes = race_notes(report_runs)
    assert set(notes) == {"synthetic-source@16"} and "full grid" in notes["synthetic-source@16"]
    text = the_answer(rows, "test_auc", races=notes).markdown()
    assert "(a race)" in text and notes["synthetic-source@16"] in text
    from metalr_bench.reports.build import build_report  # the notebook, executed by a kernel

    paths = build_report(cfg.tracking_uri, cfg.name, parent_run_id=outcome.parent_run_id,
                         output_dir=cfg.output_dir, log_artifacts=False, progress=False)
    html = Path(paths.html).read_text()
    assert "(a race)" in html and "full grid" in html

    # the model: registered under the name, tagged with the race's run, loads by name and
    # reproduces the winner's logged test metric on the test split
    version = client.get_model_version("race-pick", "1")
    assert version.tags["race_parent_run_id"] == outcome.parent_run_id
    # ... and says what it is on its page (issue 39: the description was empty)
    d = version.description
    assert "**full**" in d and "synthetic-source@16" in d and "smallcnn" in d, d
    assert "Optuna study" in d and "validation" in d and "Test data played no part" in d, d
    conf = race.table.set_index("strategy").loc["full"]
    assert f"test auc {conf['test_auc_mean']:.3f}, 95 % CI [{conf['ci_low']:.3f}, " in d, d
    assert 'mlflow.pytorch.load_model("models:/race-pick/1")' in d, d
    # every run names the code it came from (the UI's Source column read "-")
    assert all(r.data.tags.get("mlflow.source.name") for r in runs)
    assert all(r.data.tags.get("mlflow.source.git.commit") for r in runs), \
        "this test runs from a git checkout"
    winner_run = client.get_run(race.winner_run_id)
    assert winner_run.data.tags["strategy"] == "full"
    (model_run,) = by_kind["model"]
    pre = json.loads(Path(client.download_artifacts(model_run.info.run_id,
                                                    "preprocessing.json")).read_text())
    assert pre["image_size"] == 16 and pre["channels"] == 1 and pre["mean"] == [0.5]
    assert pre["source_run_id"] == race.winner_run_id and len(pre["class_names"]) == 4
    mlflow.set_tracking_uri(cfg.tracking_uri)
    try:
        model = mlflow.pytorch.load_model("models:/race-pick/1")
    finally:
        mlflow.set_tracking_uri("")
    bundle = DataCache().get(Cell(dataset=cfg.datasets[0], strategy="full", params={}, seed=0))
    with torch.no_grad():
        scores = model(bundle.test.images.float() / 255).numpy()
    metrics = compute_metrics(bundle.task, bundle.test.labels.numpy(), scores)
    assert metrics["auc"] == pytest.approx(winner_run.data.metrics["test_auc"], abs=1e-6)
    assert metrics["acc"] == pytest.approx(winner_run.data.metrics["test_acc"], abs=1e-6)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, json
    sys.path.insert(0, sys.argv[2])
    from test_race import Inverted
    from metalr_bench.strategies.core.base import STRATEGIES
    STRATEGIES[Inverted.name] = Inverted
    from metalr_bench.benchmark.tuning import studies as tuning
    from metalr_bench.benchmark.config import validate_config
    from metalr_bench.benchmark.racing.orchestration import run_race
    from metalr_bench.benchmark.racing.settings import RaceSettings

    orig = tuning.PruningReporter.on_epoch_end
    def on_epoch_end(self, epoch, metrics):
        # trials 0 and 1 finished; die hard in trial 2, before its first report (since
        # epochs are reported 1-based, Hyperband may prune it right after that report)
        if self.trial.number == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        orig(self, epoch, metrics)
    tuning.PruningReporter.on_epoch_end = on_epoch_end
    run_race(validate_config(json.loads(sys.argv[1])), RaceSettings(n_trials=4, top_k=1),
             progress=False)
""")


def test_a_killed_race_rerun_continues_the_same_study_no_trial_lost_or_repeated(
    tiny_config: dict[str, Any],
) -> None:
    data = race_data(tiny_config, seeds=[0])
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(data),
                           str(Path(__file__).parent)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    with inverted_registered():
        cfg = validate_config(data)
        settings = RaceSettings(n_trials=4, top_k=1)
        storage = tuning.storage_url(race_config(cfg, settings))
        (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        before = optuna.load_study(study_name=name, storage=storage).get_trials()
        assert [t.state for t in before][2:] == [TrialState.RUNNING]
        assert all(t.state in tuning.FINISHED_STATES for t in before[:2])
        outcome = run_race(cfg, settings, progress=False)  # the same command again
    assert not outcome.failed, outcome.failed
    assert outcome.races[0].study_name == name  # the same study
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    states = [t.state for t in trials]
    # kept: the two finished trials (same params and values); the killed one is FAIL and does
    # not count; two new ones make the 4 finished trials asked for, and no more
    assert states[2] == TrialState.FAIL and len(trials) == 5
    assert sum(s in tuning.FINISHED_STATES for s in states) == 4
    for old, new in zip(before[:2], trials[:2], strict=True):
        assert (old.params, old.value, old.state) == (new.params, new.value, new.state)
    client = MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    studies = [r for r in runs if r.data.tags["kind"] == "study"]
    assert len(studies) == 1  # the study's MLflow run is reused
    trial_runs = [r for r in runs if r.data.tags["kind"] == "trial"]
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in trial_runs)
    assert numbers == [0, 1, 2, 3, 4]  # one run per trial, none repeated
    killed = next(r for r in trial_runs if r.data.tags["optuna.trial_number"] == "2")
    assert killed.info.status == "KILLED" and killed.data.tags["optuna.state"] == "FAIL"
    assert all(r.data.tags["mlflow.parentRunId"] == studies[0].info.run_id for r in trial_runs)


def test_a_race_on_the_local_executor_shares_its_study_between_the_workers(
    tiny_config: dict[str, Any],
) -> None:
    """``--executor local --workers 2``: the search's trials run in the two worker processes
    (not in the driver), which share the one study and fill ``n_trials`` exactly: no trial lost
    or run twice, each trial one MLflow run under the study's run; then the confirmation."""
    from metalr_bench.benchmark.tuning import stale_trials

    lr = {"lr": {"low": 1e-3, "high": 1e-2}}
    data = race_data(tiny_config, strategies=["full", "last_k"], seeds=[0], executor="local",
                     workers=2)
    data["tune"] = {**data["tune"], "params": {"full": lr, "last_k": lr}}
    cfg = validate_config(data)
    settings = RaceSettings(n_trials=6, top_k=1)
    outcome = run_race(cfg, settings, progress=False)
    assert not outcome.failed, outcome.failed
    (race,) = outcome.races
    storage = tuning.storage_url(race_config(cfg, settings))
    assert storage.endswith("optuna-journal.log")  # the parallel workers' storage
    trials = optuna.load_study(study_name=race.study_name,
                               storage=tuning.open_storage(storage)).get_trials()
    # the workers' 6 search trials, then a top-up in the driver for each strategy Hyperband
    # left without a trial at full resource (issue 38)
    search = [t for t in trials if not t.user_attrs.get("race.top_up")]
    assert [t.number for t in search] == list(range(6))
    assert all(t.user_attrs.get("race.top_up") for t in trials[6:])
    assert all(t.state in tuning.FINISHED_STATES for t in trials)
    assert {t.params["strategy"] for t in trials if t.state == TrialState.COMPLETE} == {
        "full", "last_k"}
    workers = {t.user_attrs["worker"] for t in search}
    assert len(workers) == 2 and stale_trials.worker_id() not in workers
    client = MlflowClient(cfg.tracking_uri if "://" in cfg.tracking_uri else None)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (study_run,) = [r for r in runs if r.data.tags["kind"] == "study"]
    trial_runs = [r for r in runs if r.data.tags["kind"] == "trial"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trial_runs) == list(
        range(len(trials)))
    assert all(r.data.tags["mlflow.parentRunId"] == study_run.info.run_id for r in trial_runs)
    assert study_run.data.metrics["n_complete"] + study_run.data.metrics["n_pruned"] == len(
        trials)
    assert race.winner in {"full", "last_k"} and len(race.results) == 1


def test_race_help_flags_and_bad_inputs(tiny_config: dict[str, Any],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["race", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--n-trials", "--top-k", "--register", "--min-epochs",
                 "--trial-epochs", "--timings", "--seeds", "--epochs", "--workers-per-study"):
        assert flag in out
    assert "workers sharing the race's study" in " ".join(out.split())
    cfg = validate_config(tiny_config)
    for settings, words in (
        (RaceSettings(top_k=0), "`--top-k` 0"),
        (RaceSettings(n_trials=0), "`--n-trials` 0"),
        (RaceSettings(min_epochs=5), "`--min-epochs` 5 is more than a trial's 2 epoch(s)"),
        (RaceSettings(register="bad name!"), "`--register` 'bad name!'"),
    ):
        with pytest.raises(RaceError, match=words.replace("(", r"\(").replace(")", r"\)")):
            check_settings(cfg, settings)
    file_store = validate_config({**tiny_config, "tracking_uri": "mlruns"})
    with pytest.raises(RaceError, match="Model Registry"):
        check_settings(file_store, RaceSettings(register="x"))
    # through the door: one error line, exit 2, nothing run
    code = main(["race", "--dataset", "synthetic", "--tracking-uri", tiny_config["tracking_uri"],
                 "--top-k", "0", "--no-progress"])
    assert code == 2 and "run-benchmark: error: `--top-k` 0" in capsys.readouterr().err


def test_a_real_config_is_a_valid_race_command() -> None:
    """`run-benchmark race --config configs/medmnist-real3.yaml --n-trials N --register X`:
    its config, its own per-dataset pre-training sources and the race's settings validate (the
    data is not loaded here)."""
    cfg = load_config(ROOT / "configs" / "medmnist-real3.yaml")
    settings = RaceSettings(n_trials=40, top_k=3, register="X")
    check_settings(cfg, settings)
    rcfg = race_config(cfg, settings)
    assert rcfg.seeds == [0, 1, 2, 3, 4] and rcfg.tune.n_trials == 40
    assert rcfg.tune.pruner == "hyperband" and rcfg.tune.epochs == 3
    assert cfg.datasets[0].pretrain is not None  # a dataset with its own source
    assert race_config(validate_config({}), RaceSettings()).seeds == [0, 1, 2, 3, 4]
    assert race_study.arm_values({"strategy": "l2sp", "l2sp.lr": 0.1, "l2sp.alpha": 0.2,
                                  "full.lr": 0.3}, "l2sp") == {"lr": 0.1, "alpha": 0.2}


# -- issue 38: rungs at the epochs they name, a fair gate -------------------------------------------
def _epochs_loop(study: optuna.Study, curves: list[list[float]]) -> None:
    """Run one trial per curve through the real :class:`PruningReporter`, epoch by epoch as
    the trainer calls it (0-based ``epoch``)."""
    for curve in curves:
        trial = study.ask()
        reporter = tuning.PruningReporter(trial, "val_auc")
        try:
            for epoch, v in enumerate(curve):
                reporter.on_epoch_end(epoch, {"val_auc": v})
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        study.tell(trial, max(curve))


def test_a_hyperband_pruned_trial_can_stop_after_exactly_min_resource_epochs() -> None:
    """``HyperbandPruner(min_resource=1, max_resource=3)`` counts the steps it is told: with
    epochs reported 1-based, its first rung is after epoch 1 (0-based, it fired after epoch 2
    and every pruned trial trained 2 epochs)."""
    from metalr_bench.benchmark.config import TuneSpec

    study = optuna.create_study(direction="maximize",
                                pruner=tuning.make_pruner(TuneSpec(pruner="hyperband"), 3),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    good = [[0.9, 0.92, 0.95]] * 6
    bad = [[0.5, 0.55, 0.6]] * 30
    _epochs_loop(study, good + bad)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "nothing pruned"
    assert min(len(t.intermediate_values) for t in pruned) == 1
    assert all(min(t.intermediate_values) == 1 for t in study.get_trials())  # epoch 1 is step 1
    # the grid's median pruner reads the same steps: it may still prune after the first epoch
    median = optuna.create_study(direction="maximize",
                                 pruner=tuning.make_pruner(TuneSpec(pruner="median"), 3))
    _epochs_loop(median, good + bad)
    assert {len(t.intermediate_values) for t in
            median.get_trials(states=(TrialState.PRUNED,))} == {1}


def _told(study: optuna.Study, strategy: str, curve: list[float], complete: bool) -> None:
    """A trial of ``strategy`` told by hand with its per-epoch values (1-based steps)."""
    dists = {"strategy": optuna.distributions.CategoricalDistribution(
                 ["linear_probe", "full", "last_k"]),
             f"{strategy}.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    study.add_trial(optuna.trial.create_trial(
        params={"strategy": strategy, f"{strategy}.lr": 1e-3 * (1 + len(study.trials))},
        distributions=dists, intermediate_values={e + 1: v for e, v in enumerate(curve)},
        value=max(curve) if complete else None,
        state=TrialState.COMPLETE if complete else TrialState.PRUNED))


def test_the_gate_compares_strategies_at_the_same_rung_a_flat_strategy_does_not_win_by_promotion(
    tmp_path: Path,
) -> None:
    """``linear_probe`` is flat from epoch 1 (0.80), so Hyperband promotes it to the last rung
    7 times; ``full`` climbs, and its trials were stopped at epoch 2 (0.84 there). The old gate
    ranked only COMPLETE trials: ``full`` was not on the board at all (dropped on fewer rungs).
    At the same rung (2 epochs, the deepest both reached) ``full`` leads."""
    study = optuna.create_study(direction="maximize",
                                storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    for _ in range(7):
        _told(study, "linear_probe", [0.80, 0.80, 0.80], complete=True)
    _told(study, "full", [0.70, 0.84], complete=False)
    _told(study, "full", [0.65], complete=False)
    _told(study, "full", [0.72, 0.83], complete=False)
    board = race_study.leaders(study, "auc")
    assert [b.strategy for b in board] == ["full", "linear_probe"]
    assert [b.rung for b in board] == [2, 2] and [b.depth for b in board] == [2, 3]
    assert board[0].value == pytest.approx(0.84) and board[0].trial_number == 7
    assert (board[0].n_complete, board[0].n_pruned) == (0, 3)
    assert board[1].value == pytest.approx(0.80) and board[1].n_complete == 7
    # once `full` has a trial at full resource, the gate's rung is the last one
    _told(study, "full", [0.70, 0.84, 0.86], complete=True)
    board = race_study.leaders(study, "auc")
    assert [(b.strategy, b.rung, b.value) for b in board] == [
        ("full", 3, pytest.approx(0.86)), ("linear_probe", 3, pytest.approx(0.80))]
    # and a loss is minimised: the best within the rung is the smallest
    loss = optuna.create_study(direction="minimize")
    _told(loss, "linear_probe", [0.5, 0.5, 0.5], complete=True)
    _told(loss, "full", [0.9, 0.4], complete=False)
    assert [(b.strategy, b.value) for b in race_study.leaders(loss, "val_loss")] == [
        ("full", pytest.approx(0.4)), ("linear_probe", pytest.approx(0.5))]


def test_every_named_strategy_is_raced_to_full_resource_and_listed(
    tiny_config: dict[str, Any],
) -> None:
    """Three strategies, two search trials: at least one strategy is never sampled and the
    others may be pruned. The old race confirmed what had a COMPLETE trial and said nothing of
    the rest; now each named strategy gets a trial at full resource (a top-up, unpruned, with
    its best params so far) and the summary lists every one of them."""
    from metalr_bench.benchmark.racing.formatting import format_race

    names = ["full", "inverted", "last_k"]
    with inverted_registered():
        cfg = validate_config(race_data(tiny_config, strategies=names, seeds=[0]))
        outcome = run_race(cfg, RaceSettings(n_trials=2, top_k=3), progress=False)
    (race,) = outcome.races
    study = optuna.load_study(study_name=race.study_name,
                              storage=tuning.storage_url(race_config(cfg, RaceSettings())))
    complete = {t.params["strategy"] for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert complete == set(names)
    assert all(max(t.intermediate_values) == 2
               for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert sorted(race.confirmed) == names and {b.rung for b in race.board} == {2}
    text = format_race(outcome.races)
    print(text)
    for s in names:
        assert f"  {s} " in text, text
    assert "It is the only strategy" not in text
    assert {r["strategy"] for r in race.as_dict()["strategies"]} == set(names)


def test_a_race_of_one_strategy_and_the_flags_a_race_ignores_are_refused_in_one_line(
    tiny_config: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["race", "--dataset", "synthetic", "--tracking-uri", tiny_config["tracking_uri"],
            "--output-dir", tiny_config["output_dir"], "--no-progress"]
    with pytest.raises(RaceError, match="`strategies`: a race needs at least 2"):
        check_settings(validate_config({**tiny_config, "strategies": ["full"]}), RaceSettings())
    for extra, words in ((["--strategy", "full"], "`strategies`: a race needs at least 2"),
                         (["--pruner", "median"], "`--pruner median`: the race prunes"),
                         (["--sampler", "random"], "`--sampler random`: the race samples")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"run-benchmark: error: {words}"), err
    # --tune asks for what a race does anyway: said once, then the race goes on (here it
    # stops at the next bad flag, before anything runs)
    assert main(base + ["--tune", "--top-k", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("--tune") == 1 and "a race always tunes" in err


def test_the_share_is_also_against_the_grid_as_it_runs_measured_or_estimated(
    tiny_config: dict[str, Any],
) -> None:
    """`plan`'s price counts every grid trial at full epochs (an upper bound); the share is
    also given against the grid with its pruning: estimated from the race's own pruning rate
    when no grid ran, measured from the grid's trial runs (same study names) when one did.
    Hand computation: every strategy trains the same number of steps per epoch here."""
    from metalr_bench.benchmark.planning.plan import cached_sizes, count_run
    from metalr_bench.benchmark.racing.outcome import compute_spent
    from metalr_bench.benchmark.tracking import tags as T
    from metalr_bench.benchmark.tracking.client import Tracker

    cfg = validate_config({**tiny_config, "precise_bn": False, "system_metrics": False})
    rcfg = race_config(cfg, RaceSettings(n_trials=4))
    (spec,) = race_study.race_specs(rcfg, DataCache())
    sizes: dict[str, Any] = {}
    per_epoch = count_run(rcfg, Cell(dataset=spec.dataset, strategy="full", params={}, seed=0),
                          cached_sizes(sizes, spec.dataset), epochs=1,
                          evaluate_test=False).train_steps
    full = rcfg.tune.epochs or rcfg.epochs  # 2
    n = cfg.tune.n_trials  # the grid's trials per strategy (20)
    tuning_bound = 2 * n * full * per_epoch
    final = 2 * len(rcfg.seeds) * rcfg.epochs * per_epoch
    study = optuna.create_study(direction="maximize")
    _told(study, "full", [0.6], complete=False)          # 1 of 2 epochs
    _told(study, "full", [0.6, 0.7], complete=True)      # 2 of 2
    study.add_trial(optuna.trial.create_trial(            # a top-up: not a pruning rate
        params={"strategy": "last_k"}, intermediate_values={1: 0.5, 2: 0.5},
        distributions={"strategy": optuna.distributions.CategoricalDistribution(
            ["linear_probe", "full", "last_k"])}, value=0.5, user_attrs={"race.top_up": True}))
    tracker = Tracker(cfg.tracking_uri, cfg.name)
    c = compute_spent(rcfg, cfg, spec, study, [], tracker, None)
    assert c.grid_iters == tuning_bound + final  # the upper bound, as before
    assert c.grid_run_estimated and c.grid_run_iters == round(0.75 * tuning_bound) + final
    assert "estimated" in c.grid_run_how and "75 %" in c.grid_run_how
    text = c.sentence()
    assert f"of an estimated {c.grid_run_iters:,}" in text and "an upper bound" in text
    # a grid ran in this experiment: its trials at the epochs they trained
    for strategy, epochs in (("full", 1), ("full", 2), ("last_k", 2), ("last_k", 2)):
        tags = {T.KIND: T.KIND_TRIAL, T.STUDY_NAME: spec.arms[strategy].name}
        with tracker.run(f"{strategy} trial", tags) as run_id:
            for e in range(epochs):
                tracker.log_metrics(run_id, {"train_loss": 1.0}, step=e)
    c = compute_spent(rcfg, cfg, spec, study, [], tracker, None)
    assert not c.grid_run_estimated and "measured" in c.grid_run_how
    assert c.grid_run_iters == n * per_epoch * (1.5 + 2) + final
    assert c.share_run_iters == pytest.approx(c.race_iters / c.grid_run_iters)
    assert f"of the {c.grid_run_iters:,} the full grid spends as it runs" in c.sentence()


def test_a_trial_closes_its_run_in_one_mlflow_request_and_log_batch_keeps_every_item(
    mlflow_uri: str,
) -> None:
    """The profile (issue 38) found each MLflow request a round trip and a SQLite transaction;
    a trial's closing params, tags and metrics now go in one ``log_batch``. Over MLflow's
    per-request limits (100 params/tags) it splits, and nothing is lost."""
    from metalr_bench.benchmark.tracking.client import Tracker

    tracker = Tracker(mlflow_uri, "batch")
    calls: list[str] = []
    real = tracker._call

    def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__name__", ""))
        return real(fn, *args, **kwargs)

    with tracker.run("r") as run_id:
        tracker._call = counting  # type: ignore[method-assign]
        tracker.log_batch(run_id, params={f"p{i}": i for i in range(150)},
                          tags={"optuna.state": "COMPLETE", "mechanism": "x"},
                          metrics={"objective": 0.75, "best_val_auc": 0.8}, step=3)
        tracker._call = real  # type: ignore[method-assign]
    assert calls == ["log_batch", "log_batch"]  # 150 params: two requests, not 4 calls or more
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert len([k for k in run.data.params if k.startswith("p")]) == 150
    assert run.data.tags["optuna.state"] == "COMPLETE" and run.data.tags["mechanism"] == "x"
    assert run.data.metrics == {"objective": 0.75, "best_val_auc": 0.8}
    (m,) = MlflowClient(mlflow_uri).get_metric_history(run_id, "objective")
    assert m.step == 3


@pytest.mark.slow
def test_the_trial_profile_times_the_phases_inside_local_workers(tmp_path, capsys) -> None:
    """Issue 38 asks where a trial's time goes serially *and with 2 local workers*. The profile
    only timed its own process, so with workers it would have seen no trial at all (it had no
    --workers: argparse refused the flag). Now each worker times itself (the executor's
    METALR_BENCH_WORKER_INIT hook) and the driver merges the tallies."""
    from metalr_bench.benchmark.perf import profile_trial

    profile_trial.main(["--dataset", "synthetic", "--root", str(tmp_path), "--size", "16",
                        "--arch", "smallcnn", "--strategies", "full", "last_k",
                        "--n-trials", "2", "--trial-epochs", "1", "--epochs", "1",
                        "--workers", "2"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["workers"] == 2 and figures["n_trials"] >= 2 and figures["n_cells"] == 1
    # the trials ran in the workers: their steps come from the workers' files
    assert figures["phases"]["training steps"]["trial_s"] > 0
    assert 0 < figures["outside_steps_race"] < 1
    assert "METALR_BENCH_WORKER_INIT" not in os.environ


def test_the_trial_profile_times_only_its_own_thread() -> None:
    """A run's heartbeat calls MLflow from a background thread once a minute; timed on the same
    stack as the trial, its seconds were booked to whatever phase the main thread was in."""
    import threading
    import time as time_mod

    from metalr_bench.benchmark.perf.profile_trial import Profiler

    class Owner:
        def background(self) -> None:
            time_mod.sleep(0.05)

        def trial(self) -> None:
            t = threading.Thread(target=self.background)
            t.start()
            t.join()

    prof = Profiler()
    prof._patch(Owner, "background", "MLflow calls", None)
    prof._patch(Owner, "trial", "trial: other", "trial")
    try:
        Owner().trial()
    finally:
        prof.uninstall()
    assert ("trial", "MLflow calls") not in prof.excl
    assert prof.excl[("trial", "trial: other")] >= 0.05 and len(prof.units["trial"]) == 1


def test_a_races_control_line_does_not_claim_the_same_starting_rates(tiny_config) -> None:
    """In a race, `metalr` and `discriminative` are arms of one study, each with its own tuned
    learning rate. The race's answer built its table without saying the runs were tuned, so
    the control line read "both untuned: the same starting rates" (seen on BreastMNIST: metalr
    at lr 0.0072, discriminative at 0.0096). It must say the comparison is not like for like."""
    from metalr_bench.benchmark.racing.outcome import Compute, DatasetRace, answer_race
    from metalr_bench.benchmark.training.cell import CellResult
    from metalr_bench.benchmark.tuning.race_study import Leader

    cfg = load_config(None, {**tiny_config, "strategies": ["metalr", "discriminative"],
                             "seeds": [0, 1, 2]})
    auc = {"metalr": [0.86, 0.84, 0.90], "discriminative": [0.88, 0.87, 0.89]}
    results = [CellResult(c, f"run-{c.strategy}-{c.seed}", "h", "FINISHED",
                          {"test_auc": auc[c.strategy][c.seed], "best_val_auc": 0.9,
                           "mean_epoch_time_s": 1.0})
               for c in cfg.cells()]
    board = [Leader("metalr", 0.93, 1, {"strategy": "metalr", "metalr.lr": 7e-3}, 1, 0, 2, 2),
             Leader("discriminative", 0.93, 2,
                    {"strategy": "discriminative", "discriminative.lr": 9e-3}, 1, 0, 2, 2)]
    race = DatasetRace("synthetic@16", "s", {}, board, confirmed=["metalr", "discriminative"],
                       results=results,
                       compute=Compute(10, 10, 100, 1.0, 1.0, None, ""))
    answer_race(cfg, race)
    text = " ".join(race.answer)
    assert "MetaLR's learned rates over its starting rates" in text
    assert "the same starting rates" not in text
    assert "not like for like" in text
    # the race's seconds are its trials' and runs' durations summed (over workers too): with
    # 2 workers on BreastMNIST, 34.2 min of them in 21.0 min of wall time; it said "wall time"
    assert "of wall time" not in text and "2 s of trial and run time" in text
