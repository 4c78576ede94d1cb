"""Fair tuning: Optuna studies per (dataset, strategy), nested MLflow runs, resume, no test reads."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from metalr_bench.benchmark.cli import _run_parser, resolve_config
from metalr_bench.benchmark.config import ConfigError, validate_config
from metalr_bench.benchmark.running import runner as runner_mod
from metalr_bench.benchmark.running.runner import run_benchmark
from metalr_bench.benchmark.training import trainer as trainer_mod
from metalr_bench.benchmark.tuning import studies as tuning
from metalr_bench.benchmark.tuning.space import search_space
from metalr_bench.strategies import get_strategy
from mlflow import MlflowClient
from optuna.trial import TrialState


def tune_config(tiny: dict[str, Any], **tune: Any) -> dict[str, Any]:
    return {**tiny, "epochs": 1, "tune": {"enabled": True, "n_trials": 3, **tune}}


def runs_by_kind(uri: str, experiment: str) -> dict[str, list[Any]]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list[Any]] = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        kind = r.data.tags.get("kind", "cell")
        if kind == "cell" and r.data.tags.get("tuned"):
            kind = "final"
        out.setdefault(kind, []).append(r)
    return out


class SplitReads:
    """Records every split the trainer loads or evaluates, per phase (tuning / final)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.phase = "final"
        self.loaded: list[tuple[str, str]] = []  # (phase, "train"/"val"/"test"/"other")
        self.evaluated: list[tuple[str, str]] = []
        self.tests: list[str] = []
        self._test_ids: set[int] = set()
        self._val_ids: set[int] = set()
        orig_init, orig_loader = trainer_mod.Trainer.__init__, trainer_mod.make_loader
        orig_eval, orig_test = trainer_mod.Trainer.evaluate, trainer_mod.Trainer._test
        orig_tune_all = tuning.tune_all

        def init(trainer, bundle, *a, **k):
            self._test_ids.add(id(bundle.test))
            self._val_ids.add(id(bundle.val))
            orig_init(trainer, bundle, *a, **k)

        def loader(split, *a, **k):
            which = ("test" if id(split) in self._test_ids else
                     "val" if id(split) in self._val_ids else "train")
            self.loaded.append((self.phase, which))
            return orig_loader(split, *a, **k)

        def evaluate(trainer, split):
            self.evaluated.append((self.phase, split))
            return orig_eval(trainer, split)

        def test(trainer):
            self.tests.append(self.phase)
            return orig_test(trainer)

        def tune_all(*a, **k):
            self.phase = "tuning"
            try:
                return orig_tune_all(*a, **k)
            finally:
                self.phase = "final"

        monkeypatch.setattr(trainer_mod.Trainer, "__init__", init)
        monkeypatch.setattr(trainer_mod, "make_loader", loader)
        monkeypatch.setattr(trainer_mod.Trainer, "evaluate", evaluate)
        monkeypatch.setattr(trainer_mod.Trainer, "_test", test)
        monkeypatch.setattr(runner_mod, "tune_all", tune_all)


class ListHandler(logging.Handler):
    """Keeps the messages a logger emits."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class PruneTrialOne(optuna.pruners.BasePruner):
    """Deterministic: prune trial 1 at its first report, never any other."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 1


def test_two_strategies_three_trials_nested_runs_pruning_best_params_and_no_test_reads(
    tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = SplitReads(monkeypatch)
    optuna.logging.set_verbosity(optuna.logging.INFO)  # Optuna's default, whatever ran before
    said = ListHandler()  # what Optuna's own stderr handler would print
    logging.getLogger("optuna").addHandler(said)
    monkeypatch.setattr(tuning, "make_pruner", lambda tune, epochs: PruneTrialOne())
    monkeypatch.setattr(get_strategy("last_k"), "mechanism", "trainable_share")
    monkeypatch.setattr(get_strategy("full"), "mechanism", None)
    cfg = validate_config(tune_config(tiny_config, epochs=2))  # trials: 2 epochs; finals: 1
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed and len(outcome.results) == 4  # 2 strategies x 2 seeds
    # quiet without a bar too: Optuna's INFO line for every study and trial stays out
    logging.getLogger("optuna").removeHandler(said)
    assert not [m for m in said.messages if "study created" in m or "finished with" in m], \
        said.messages[:3]

    # the test split: never loaded nor evaluated while tuning; twice per final run afterwards
    # (the checkpoint chosen on validation, and the last epoch's weights for last_test_*)
    assert ("tuning", "test") not in reads.loaded and ("tuning", "test") not in reads.evaluated
    assert ("tuning", "val") in reads.evaluated and "tuning" not in reads.tests
    assert reads.tests == ["final"] * 8 and ("final", "test") in reads.loaded

    storage = tuning.storage_url(cfg)
    assert storage == f"sqlite:///{Path(tiny_config['tracking_uri'][10:]).parent / 'optuna.db'}"
    summaries = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    assert len(summaries) == 2
    runs = runs_by_kind(cfg.tracking_uri, cfg.name)
    (parent,) = runs["benchmark"]
    assert parent.data.tags["tuned"] == "true"
    assert {r.data.tags["strategy"] for r in runs["study"]} == {"full", "last_k"}
    assert len(runs["trial"]) == 6 and len(runs["final"]) == 4

    for study_run in runs["study"]:
        tags = study_run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["optuna.storage"] == storage and tags["optuna.study_name"] in summaries
        study = optuna.load_study(study_name=tags["optuna.study_name"], storage=storage)
        trials = study.get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED,
                                             TrialState.COMPLETE]
        assert study.best_trial.number in (0, 2)
        assert study_run.data.metrics["n_pruned"] == 1
        mine = [r for r in runs["trial"]
                if r.data.tags["mlflow.parentRunId"] == study_run.info.run_id]
        by_number = {int(r.data.tags["optuna.trial_number"]): r for r in mine}
        assert sorted(by_number) == [0, 1, 2] and len(mine) == 3
        client = MlflowClient(cfg.tracking_uri)
        for t in trials:
            run = by_number[t.number]
            assert run.info.run_id == t.user_attrs["mlflow_run_id"]
            assert run.data.tags["optuna.state"] == t.state.name and run.info.status == "FINISHED"
            assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
            if t.state == TrialState.COMPLETE:  # a trial logs the mechanism like a cell run
                assert run.data.tags.get("mechanism") == (
                    "trainable_share" if tags["strategy"] == "last_k" else None)
                assert int(run.data.params["n_trainable_params"]) > 0
            assert not any(k.startswith("test_") for k in run.data.metrics)
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")]
            if t.state == TrialState.PRUNED:  # stopped after its first epoch
                assert steps == [0] and "objective" not in run.data.metrics
            else:
                assert steps == [0, 1]
                assert run.data.metrics["objective"] == pytest.approx(t.value)
        # best params and value logged on the study run
        assert study_run.data.metrics["best_value"] == pytest.approx(study.best_value)
        for k, v in study.best_params.items():
            assert study_run.data.metrics[f"best.{k}"] == pytest.approx(v)
            assert tags[f"best.{k}"] == str(v)

        # the final runs use the best parameters, on every seed, with test metrics
        finals = [r for r in runs["final"] if r.data.tags["optuna.study_name"] == study.study_name]
        assert sorted(int(r.data.tags["seed"]) for r in finals) == [0, 1]
        for r in finals:
            assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert r.data.tags["tuned"] == "true" and "test_auc" in r.data.metrics
            assert r.data.params["epochs"] == "1"
            assert float(r.data.params["lr"]) == pytest.approx(study.best_params["lr"])
            if tags["strategy"] == "last_k":
                assert int(r.data.params["strategy.k"]) == study.best_params["k"]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, json
    from metalr_bench.benchmark.tuning import studies as tuning
    from metalr_bench.benchmark.config import validate_config
    from metalr_bench.benchmark.running.runner import run_benchmark

    orig = tuning.PruningReporter.on_epoch_end
    def on_epoch_end(self, epoch, metrics):
        orig(self, epoch, metrics)
        if self.trial.number == 1:  # trial 0 finished; die hard in the middle of trial 1
            os.kill(os.getpid(), signal.SIGKILL)
    tuning.PruningReporter.on_epoch_end = on_epoch_end
    run_benchmark(validate_config(json.loads(sys.argv[1])), progress=False)
""")


def test_kill_and_rerun_continues_the_same_study(tiny_config: dict[str, Any]) -> None:
    import json

    data = {**tune_config(tiny_config, pruner="none"), "strategies": ["full"], "seeds": [0]}
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(data)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    cfg = validate_config(data)
    storage = tuning.storage_url(cfg)
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    before = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]
    first_value = before[0].value

    outcome = run_benchmark(cfg, progress=False)  # re-run: same config -> same study
    assert not outcome.failed
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                      TrialState.COMPLETE]
    assert sum(s in tuning.FINISHED_STATES for s in states) == 3
    assert trials[0].value == first_value  # the finished trial was kept, not re-run

    runs = runs_by_kind(cfg.tracking_uri, cfg.name)
    assert len(runs["benchmark"]) == 2 and len(runs["study"]) == 1  # the study run is reused
    (study_run,) = runs["study"]
    second_parent = [r for r in runs["benchmark"] if r.info.status == "FINISHED"]
    assert study_run.data.tags["mlflow.parentRunId"] == second_parent[0].info.run_id
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in runs["trial"]}
    assert sorted(by_number) == [0, 1, 2, 3] and len(runs["trial"]) == 4
    assert by_number[1].data.tags["optuna.state"] == "FAIL"
    assert by_number[1].info.status == "KILLED"
    for n in (0, 2, 3):
        assert by_number[n].data.tags["optuna.state"] == "COMPLETE"
        assert by_number[n].data.tags["mlflow.parentRunId"] == study_run.info.run_id
    (final,) = runs["final"]
    best = optuna.load_study(study_name=name, storage=storage).best_params
    assert float(final.data.params["lr"]) == pytest.approx(best["lr"])


def test_keyboard_interrupt_marks_trial_and_run(
    tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    orig = tuning.PruningReporter.on_epoch_end

    def interrupt(self, epoch, metrics):
        orig(self, epoch, metrics)
        if self.trial.number == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(tuning.PruningReporter, "on_epoch_end", interrupt)
    cfg = validate_config({**tune_config(tiny_config), "strategies": ["full"], "seeds": [0]})
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg, progress=False)
    runs = runs_by_kind(cfg.tracking_uri, cfg.name)
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in runs["trial"]}
    assert by_number[1].info.status == "KILLED" and by_number[1].data.tags["optuna.state"] == "FAIL"
    assert runs["study"][0].info.status == "KILLED" and "final" not in runs
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(tuning.storage_url(cfg))]
    study = optuna.load_study(study_name=name, storage=tuning.storage_url(cfg))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]


def test_journal_storage_and_study_name(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    journal = tmp_path / "studies" / "optuna.log"
    journal.parent.mkdir()  # a missing folder is refused, as the tracking URI's (issue 39)
    cfg = validate_config({**tune_config(tiny_config, storage=str(journal), n_trials=1),
                           "strategies": ["l2sp"], "seeds": [0]})
    assert not run_benchmark(cfg, progress=False).failed
    assert journal.is_file()
    storage = tuning.open_storage(str(journal))
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.study_name.startswith("test-synthetic@16-l2sp-")
    assert set(summary.best_trial.params) == {"lr", "alpha"}

    # the README's `optuna-dashboard <journal file>` serves this study, trials and all
    with _dashboard(str(journal), tmp_path / "dashboard.log") as get:
        served = get("/api/studies")["study_summaries"]
        assert [st["study_name"] for st in served] == [summary.study_name]
        detail = get(f"/api/studies/{served[0]['study_id']}")
    (trial,) = detail["trials"]
    assert {p["name"] for p in trial["params"]} == {"lr", "alpha"}

    spec = tuning.study_specs(cfg, _Data())[0]
    assert spec.name == summary.study_name  # derived from the config: stable
    more = validate_config({**cfg.model_dump(), "tune": {**cfg.tune.model_dump(), "n_trials": 9}})
    assert tuning.study_specs(more, _Data())[0].name == spec.name  # n_trials may grow
    other = validate_config({**cfg.model_dump(), "tune": {**cfg.tune.model_dump(), "epochs": 3}})
    assert tuning.study_specs(other, _Data())[0].name != spec.name


@contextlib.contextmanager
def _dashboard(storage: str, log: Path, timeout_s: float = 60.0) -> Iterator[Callable[[str], Any]]:
    """The real ``optuna-dashboard`` serving ``storage``; yields ``get(path) -> JSON``."""
    from metalr_bench.benchmark.tracking.server import free_port

    port = free_port()
    with open(log, "w") as out:  # a file, not a pipe: a chatty server cannot block on it
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from optuna_dashboard._cli import main; "
             "sys.exit(main())", storage, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT)

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return json.loads(r.read())

    try:
        deadline = time.monotonic() + timeout_s
        while True:  # wait until it answers
            try:
                get("/api/studies")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("optuna-dashboard did not answer: "
                                         f"{log.read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield get
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _Data:
    def get(self, cell: Any) -> Any:
        from metalr_bench.datasets.core.registry import load_dataset

        d = cell.dataset
        return load_dataset(d.name, size=d.size, options=d.options)


def test_search_space_table_and_validation() -> None:
    assert get_strategy("metalr").search_space["hyper_lr"].log
    space = search_space("last_k", 5)
    assert space["k"].type == "int" and (space["k"].low, space["k"].high) == (1, 5)
    assert space["lr"].log
    assert set(search_space("layer_decay", 5)) == {"lr", "decay"}
    cfg = validate_config({"tune": {"params": {"last_k": {"k": {"high": 9}},
                                               "full": {"lr": None}}}})
    with pytest.raises(ConfigError, match="only 5 layer groups"):
        search_space("last_k", 5, cfg.tune.params)
    assert search_space("full", 5, cfg.tune.params) == {}
    bad = validate_config({"tune": {"params": {"l2sp": {"gamma": {"low": 0, "high": 1}}}}})
    with pytest.raises(ConfigError, match="no parameter 'gamma'"):
        search_space("l2sp", 5, bad.tune.params)
    narrow = validate_config({"tune": {"params": {"l2sp": {"alpha": {"low": 0.01, "high": 0.5}}}}})
    assert (search_space("l2sp", 5, narrow.tune.params)["alpha"].high) == 0.5
    with pytest.raises(ConfigError, match="storage"):
        validate_config({"tune": {"storage": "studies.db"}})


def test_cli_flags_and_optuna_objects() -> None:
    args = _run_parser().parse_args(["--tune", "--n-trials", "4", "--sampler", "gp",
                                     "--pruner", "hyperband", "--tune-storage", "x.jsonl"])
    cfg = resolve_config(args)
    assert cfg.tune.enabled and cfg.tune.n_trials == 4 and cfg.tune.storage == "x.jsonl"
    assert isinstance(tuning.make_sampler(cfg.tune), optuna.samplers.GPSampler)
    assert isinstance(tuning.make_pruner(cfg.tune, 5), optuna.pruners.HyperbandPruner)
    default = resolve_config(_run_parser().parse_args([]))
    assert not default.tune.enabled
    assert isinstance(tuning.make_sampler(default.tune), optuna.samplers.TPESampler)
    assert isinstance(tuning.make_pruner(default.tune, 5), optuna.pruners.MedianPruner)
    assert tuning.direction("val_loss") == "minimize" and tuning.direction("auc") == "maximize"
    server = validate_config({"tracking_uri": "http://localhost:5000", "output_dir": "/tmp/o"})
    assert tuning.storage_url(server) == "sqlite:////tmp/o/optuna.db"


def test_rerun_fails_dead_trials_and_leaves_live_ones_alone(
        tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """RUNNING trials found by a driver: one beating on another host (another driver's, alive)
    is left alone and counts towards n_trials; one silent there for 30 min, one whose worker
    pid on this host is gone, and one that never beat and started an hour ago are marked FAIL.
    Trials this driver runs beat into their user attributes and MLflow runs."""
    import datetime
    import platform


    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orig = tuning.StudyRunner.create_study

    def create_study(self):
        study = orig(self)
        now = time.time()
        for worker, age in (("gpu-node-7:4242", 30), ("gpu-node-7:4243", 1800),
                            (f"{platform.node()}:{dead.pid}", 5)):
            trial = study.ask()
            trial.set_user_attr("worker", worker)
            trial.set_user_attr("heartbeat", now - age)
        study.add_trial(optuna.trial.FrozenTrial(  # killed before its first beat, an hour ago
            number=0, state=TrialState.RUNNING, value=None, values=None,
            datetime_start=datetime.datetime.now() - datetime.timedelta(hours=1),
            datetime_complete=None, params={}, distributions={}, user_attrs={},
            system_attrs={}, intermediate_values={}, trial_id=0))
        return study

    monkeypatch.setattr(tuning.StudyRunner, "create_study", create_study)
    cfg = validate_config({**tune_config(tiny_config, pruner="none"), "strategies": ["full"],
                           "seeds": [0]})
    outcome = run_benchmark(cfg, progress=False)
    assert not outcome.failed
    (summary,) = optuna.get_all_study_summaries(tuning.storage_url(cfg))
    trials = optuna.load_study(study_name=summary.study_name,
                               storage=tuning.storage_url(cfg)).get_trials()
    states = [t.state.name for t in trials]
    assert states == ["RUNNING", "FAIL", "FAIL", "FAIL", "COMPLETE", "COMPLETE"], states
    assert trials[0].user_attrs["worker"] == "gpu-node-7:4242"  # the live one, untouched
    ran = trials[4:]
    assert all(t.user_attrs["worker"] == f"{platform.node()}:{os.getpid()}" for t in ran)
    assert all(abs(t.user_attrs["heartbeat"] - time.time()) < 300 for t in ran)
    trial_runs = runs_by_kind(cfg.tracking_uri, cfg.name)["trial"]
    assert len(trial_runs) == 2
    assert all("run.heartbeat" in r.data.tags and r.data.tags["run.host"] == platform.node()
               for r in trial_runs)


def test_search_space_is_narrowed_to_valid_points_and_bad_overrides_are_refused() -> None:
    """MetaLR refuses an lr whose initial rates leave [lr_min, lr_max]: its space is narrowed by
    its own ``constrain_space`` from the fixed params, and a ``tune.params`` bound that lets
    invalid points in is refused, naming it, instead of being silently changed."""
    assert search_space("metalr", 10)["lr"].high == 1e-2  # the default lr_max: head starts at lr
    assert search_space("full", 10)["lr"].high == 1e-1  # the others keep the shared range
    narrowed = search_space("metalr", 10, fixed={"backbone_lr_scale": 0.01, "lr_max": 5e-3})
    assert (narrowed["lr"].low, narrowed["lr"].high) == pytest.approx((1e-4, 5e-3))
    wide = validate_config({"tune": {"params": {"metalr": {"lr": {"high": 0.1}}}}})
    with pytest.raises(ConfigError, match=r"`tune\.params\.metalr\.lr`: high=0\.1 .*\[1e-05, 0\.01\]"):
        search_space("metalr", 10, wide.tune.params)
    inside = validate_config({"tune": {"params": {"metalr": {"lr": {"low": 1e-4, "high": 5e-3}}}}})
    assert search_space("metalr", 10, inside.tune.params)["lr"].high == 5e-3
    scale = validate_config({"tune": {"params": {"metalr": {
        "lr": None, "backbone_lr_scale": {"low": 1e-4, "high": 1.0, "log": True}}}}})
    with pytest.raises(ConfigError, match=r"`tune\.params\.metalr\.backbone_lr_scale`: low=0\.0001"):
        search_space("metalr", 10, scale.tune.params, fixed={"lr": 1e-3})
    with pytest.raises(ConfigError, match="'metalr' cannot be tuned with its fixed params: .*"
                                          "backbone_lr_scale"):
        search_space("metalr", 10, fixed={"backbone_lr_scale": 1e-5})


def test_study_specs_pass_the_fixed_params_and_base_lr_to_the_space() -> None:
    from types import SimpleNamespace

    class Data:
        def get(self, cell: Any) -> Any:
            return SimpleNamespace(in_channels=1, num_outputs=2)

    cfg = validate_config({
        "model": {"arch": "smallcnn", "weights": "none"},
        "strategies": ["full", {"name": "metalr", "params": {"backbone_lr_scale": 0.01}}],
        "tune": {"enabled": True}})
    full, metalr = tuning.study_specs(cfg, Data())
    assert full.space["lr"].high == 1e-1
    assert metalr.fixed == {"backbone_lr_scale": 0.01}
    assert metalr.space["lr"].low == pytest.approx(1e-4)  # backbone 0.01 * lr >= lr_min 1e-6
    fixed_lr = validate_config({**cfg.model_dump(include={"model", "strategies"}), "lr": 0.05,
                                "tune": {"enabled": True, "params": {"metalr": {"lr": None}}}})
    with pytest.raises(ConfigError, match=r"'metalr' cannot be tuned .* from lr=0\.05"):
        tuning.study_specs(fixed_lr, Data())
