"""``run-benchmark``: the command-line door to the suite.

    run-benchmark                         # the quick benchmark: offline, CPU, a few minutes
    run-benchmark --config my.yaml --seeds 0 1 2 3 4
    run-benchmark --dataset pneumoniamnist --data-root ../shared/data --allow-md5-mismatch
    run-benchmark list                    # datasets and strategies
    run-benchmark plan --config configs/medmnist.yaml --timings t28.json t64.json   # cost first
    run-benchmark pretrain --model resnet18 --image-size 28

Flags override the YAML file; the file overrides the defaults.

Each subcommand imports its stage inside its handler, on purpose: `run-benchmark --help`,
`list` and `report` must not pay for torch, Optuna or papermill they do not use.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from metalr_bench.benchmark.config import ConfigError, load_config

SUBCOMMANDS: dict[str, str] = {
    "list": "list datasets and strategies",
    "plan": "count a grid's runs and iterations, and price them with measured step times",
    "pretrain": "run (or reuse) the pre-training stage only",
    "replay-metrics": "send metrics saved while the tracking server was down",
    "report": "rebuild the report notebook/HTML from MLflow",
    "race": "which strategy for a new dataset: one study across strategies, the top k "
            "confirmed on seeds, the winner's model registered",
}


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run-benchmark",
        description="Compare fine-tuning strategies (MetaLR and baselines) on medical datasets. "
        "With no arguments: the quick offline benchmark on synthetic data.",
        epilog="subcommands: " + "; ".join(f"`run-benchmark {k}`: {v}" for k, v in
                                           SUBCOMMANDS.items()),
    )
    p.add_argument("--config", help="YAML config file (flags override it)")
    p.add_argument("--name", help="benchmark / MLflow experiment name")
    p.add_argument("--dataset", action="append", dest="datasets", metavar="NAME",
                   help="dataset (repeatable); see `run-benchmark list`")
    p.add_argument("--strategy", action="append", dest="strategies", metavar="NAME",
                   help="strategy (repeatable); default: every built-in strategy")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds, e.g. --seeds 0 1 2")
    p.add_argument("--model", dest="arch", help="a zoo model (see `run-benchmark list`) or timm:<name>")
    p.add_argument("--weights", help="none | imagenet | pretrain | /path/to/checkpoint.pt")
    p.add_argument("--image-size", type=int, help="image side in pixels (MedMNIST: 28/64/128/224)")
    p.add_argument("--data-root", help="folder with the dataset files (e.g. MedMNIST npz)")
    p.add_argument("--download", action="store_true", default=None,
                   help="download missing MedMNIST files from the official URLs")
    p.add_argument("--allow-md5-mismatch", action="store_true", default=None,
                   help="accept a dataset file whose MD5 differs from the official one")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", help="adam | adamw | sgd")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", help="auto | bf16 | off")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no training augmentation (for every strategy)")
    p.add_argument("--no-precise-bn", dest="precise_bn", action="store_false", default=None,
                   help="no BatchNorm re-estimation before evaluation (for every strategy)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--output-dir", help="where leaderboards, reports and caches go")
    p.add_argument("--executor", choices=["serial", "local", "ray"],
                   help="serial (default) | local: worker processes | ray: Ray tasks")
    p.add_argument("--workers", type=int,
                   help="local executor: worker processes (default: one per visible GPU)")
    p.add_argument("--gpus-per-run", type=float,
                   help="GPU share per run, e.g. 0.25 for 28 px models (local and ray)")
    p.add_argument("--ray-address", help="Ray cluster to join, e.g. auto (default: local Ray)")
    p.add_argument("--force", action="store_true", default=None,
                   help="re-run every cell, also those already FINISHED (default: skip them "
                   "and resume interrupted ones from their last epoch)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="torch deterministic algorithms (bit-exact resume, slower on GPU)")
    p.add_argument("--tune", action="store_true", default=None,
                   help="tune each strategy with Optuna on validation data first (same trials "
                   "for every strategy), then run the grid with the best parameters")
    p.add_argument("--n-trials", type=int, help="Optuna trials per (dataset, strategy) study")
    p.add_argument("--tune-storage", help="Optuna storage: an RDB URL or a .log/.jsonl journal "
                   "file (default: optuna.db next to the MLflow DB; optuna-journal.log with "
                   "--executor local/ray)")
    p.add_argument("--workers-per-study", type=int,
                   help="tuning with --executor local/ray: workers sharing each study")
    p.add_argument("--sampler", help="tpe | gp | random (tuning)")
    p.add_argument("--pruner", help="median | hyperband | none (tuning)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress lines at all (bars, pre-training epochs); progress goes to "
                   "stderr and results to stdout either way, so `> results.txt` stays clean")
    p.add_argument("--no-system-metrics", dest="system_metrics", action="store_false",
                   default=None, help="do not log MLflow system metrics (CPU, memory, GPU) per "
                   "run (config key `system_metrics`)")
    p.add_argument("--no-report", dest="report", action="store_false", default=None,
                   help="skip the report notebook/HTML at the end")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags -> a partial config dict (only what was given)."""
    o: dict[str, Any] = {}
    for key in ("name", "seeds", "epochs", "batch_size", "lr", "optimizer", "device", "amp",
                "compile", "augment", "precise_bn", "tracking_uri", "output_dir", "executor", "workers", "gpus_per_run",
                "ray_address", "force", "deterministic", "report", "system_metrics"):
        if getattr(args, key, None) is not None:
            o[key] = getattr(args, key)
    if args.strategies:
        o["strategies"] = args.strategies
    tune = {key: getattr(args, attr) for key, attr in (
        ("enabled", "tune"), ("n_trials", "n_trials"), ("storage", "tune_storage"),
        ("sampler", "sampler"), ("pruner", "pruner"), ("workers_per_study", "workers_per_study"))
        if getattr(args, attr, None) is not None}
    if tune:
        o["tune"] = tune
    model: dict[str, Any] = {}
    if args.arch:
        model["arch"] = args.arch
    if args.weights:
        model["weights"] = args.weights
    if model:
        o["model"] = model
    dataset_fields: dict[str, Any] = {}
    if args.data_root is not None:
        dataset_fields["root"] = args.data_root
    if args.image_size is not None:
        dataset_fields["size"] = args.image_size
    if args.download:
        dataset_fields["download"] = True
    if args.allow_md5_mismatch:
        dataset_fields["allow_md5_mismatch"] = True
    if args.datasets:
        o["datasets"] = [{"adapter": d, **dataset_fields} for d in args.datasets]
    elif dataset_fields:
        o["_dataset_fields"] = dataset_fields  # applied to the file's datasets below
    return o


def resolve_config(args: argparse.Namespace):
    overrides = overrides_from_args(args)
    fields = overrides.pop("_dataset_fields", None)
    cfg = load_config(args.config, overrides)
    if fields:
        data = cfg.model_dump(mode="json", by_alias=False)  # `adapter`, not the old `name`
        data["datasets"] = [{**d, **fields} for d in data["datasets"]]
        cfg = load_config(None, data)
    return cfg


def mlflow_ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """How to open this experiment's runs table. The link names the runs page and the *Model
    training* view because MLflow 3's UI otherwise opens an experiment on its GenAI overview
    (traces), which is empty for a benchmark."""
    from metalr_bench.benchmark.tracking.server import is_remote

    runs = f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if is_remote(tracking_uri):
        return f"Browse: {tracking_uri.rstrip('/')}{runs}"
    return (f"Browse with: mlflow ui --backend-store-uri {tracking_uri}, then open "
            f"http://127.0.0.1:5000{runs}")


def cmd_run(argv: list[str]) -> int:
    """A benchmark run. What it is about to do, progress, warnings and errors go to stderr;
    the results (leaderboard, where the runs and the report are) to stdout."""
    args = _run_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    cfg = resolve_config(args)
    from metalr_bench.benchmark.running.runner import format_leaderboard, leaderboard, run_benchmark

    def announce() -> None:
        """What it is about to do (stderr), once the pre-flight passed."""
        cells = cfg.cells()
        n_data = len(cfg.dataset_specs())  # cross-validation folds count as datasets
        print(f"run-benchmark: {len(cells)} runs ({n_data} dataset(s) x "
              f"{len(cells) // n_data // len(cfg.seeds)} strategy setting(s) x "
              f"{len(cfg.seeds)} seed(s)), model {cfg.model.arch}, device {cfg.resolved_device()}, "
              f"tracking {cfg.tracking_uri}", file=sys.stderr, flush=True)
        tune_flags = [f for f, v in (("--n-trials", args.n_trials), ("--sampler", args.sampler),
                                     ("--pruner", args.pruner), ("--tune-storage", args.tune_storage),
                                     ("--workers-per-study", args.workers_per_study))
                      if v is not None]
        if tune_flags and not cfg.tune.enabled:
            print(f"run-benchmark: {', '.join(tune_flags)} only matter with --tune (or `tune: "
                  "{enabled: true}` in the config); running without tuning", file=sys.stderr)
        if cfg.tune.enabled:
            from metalr_bench.benchmark.tuning.studies import storage_url

            print(f"tuning first: {cfg.tune.n_trials} trial(s) x {len(cfg.strategies)} strateg(ies) "
                  f"x {len(cfg.dataset_specs())} dataset(s), {cfg.tune.epochs or cfg.epochs} epoch(s) each, "
                  f"objective validation {cfg.tune.metric}, storage {storage_url(cfg)}. "
                  f"Browse with: optuna-dashboard {storage_url(cfg)}", file=sys.stderr, flush=True)

    with quiet_progress(args.no_progress):
        outcome = run_benchmark(cfg, progress=not args.no_progress, announce=announce)
    skipped = sum(r.skipped for r in outcome.results)
    if skipped:
        print(f"run-benchmark: {skipped} run(s) already FINISHED earlier were skipped "
              "(use --force to re-run them)")
    print("\nLeaderboard (test metrics of the checkpoint chosen on validation, mean ± std "
          "over seeds):")
    print(format_leaderboard(leaderboard(outcome.results)))
    print(f"\nMLflow: experiment {cfg.name!r}, parent run {outcome.parent_run_id}. "
          + mlflow_ui_hint(cfg.tracking_uri, outcome.experiment_id))
    if outcome.report is not None:
        print(f"Report: {outcome.report.html} (notebook, results.csv/.parquet alongside)")
    for r in outcome.busy:
        print(f"BUSY {r.cell.dataset.dataset_key} {r.cell.strategy_label} seed={r.cell.seed}: {r.error}",
              file=sys.stderr)
    if outcome.busy:
        print(f"run-benchmark: {len(outcome.busy)} cell(s) held by another process are not in this "
              "leaderboard; run the same command again once it has finished them", file=sys.stderr)
    for r in outcome.failed:
        print(f"FAILED {r.cell.dataset.dataset_key} {r.cell.strategy_label} seed={r.cell.seed}: {r.error}",
              file=sys.stderr)
    # 1: something failed here; 4: nothing failed, but the grid is not complete yet (busy cells)
    return 1 if outcome.failed else 4 if outcome.busy else 0


def cmd_list(argv: list[str]) -> int:
    from metalr_bench.datasets.core.registry import DATASETS, available_datasets
    from metalr_bench.strategies.core.registry import available_strategies, get_strategy

    print("datasets:")
    for name in available_datasets():
        print(f"  {name:18s} {DATASETS[name].description.strip().splitlines()[0]}")
    print("strategies:")
    for name in available_strategies():
        cls = get_strategy(name)
        fields = ", ".join(f"{k}={f.default!r}" for k, f in cls.Params.model_fields.items())
        print(f"  {name:12s} {fields:40s} {cls.describe()}")
    from metalr_bench.benchmark.models.zoo import MODELS, TIMM_PREFIX

    print("models (model.arch):")
    for name, card in MODELS.items():
        print(f"  {name:18s} {card.description}")
    print(f"  {TIMM_PREFIX + '<name>':18s} any timm model, e.g. timm:convnext_atto, "
          "timm:vit_tiny_patch16_224 (built for the dataset's image size); layer groups from "
          "its group_matcher()")
    return 0


def cmd_pretrain(argv: list[str]) -> int:
    p = _run_parser()
    p.prog = "run-benchmark pretrain"
    args = p.parse_args(argv)
    cfg = resolve_config(args)
    from pathlib import Path

    from metalr_bench.benchmark.tracking.client import Tracker
    from metalr_bench.benchmark.training.pretrain import pretrained_checkpoint

    tracker = Tracker(cfg.tracking_uri, cfg.name)
    # one checkpoint per (source, target size), or per source at its own `size`
    jobs = {(cfg.pretrain_for(d).model_dump_json(), cfg.pretrain_for(d).size or d.size):
            cfg.pretrain_for(d) for d in cfg.datasets}
    for (_, size), spec in sorted(jobs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        with quiet_progress(args.no_progress):
            path = pretrained_checkpoint(
                cfg.model.arch, spec, size,
                cache_dir=Path(cfg.output_dir) / "cache" / "pretrain",
                device=cfg.resolved_device(), amp=cfg.use_amp(),
                channels_last=cfg.use_channels_last(), tracker=tracker,
                progress=not args.no_progress,
            )
        print(path)
    return 0


def cmd_plan(argv: list[str]) -> int:
    p = _run_parser()
    p.prog = "run-benchmark plan"
    p.description = SUBCOMMANDS["plan"] + " (the same flags as a run, nothing is trained)"
    p.add_argument("--timings", nargs="+", metavar="JSON",
                   help="bench_throughput --json files measured on the device the benchmark "
                   "will run on (one per image size)")
    p.add_argument("--seconds-per-iter", type=float, metavar="S",
                   help="instead of --timings: one training-step time for every strategy, at "
                   "the config's batch size")
    p.add_argument("--seconds-per-run", type=float, default=0.0, metavar="S",
                   help="time each run spends outside training (data, model set-up, MLflow, "
                   "checkpoints), added to every run and trial; --check measures it")
    p.add_argument("--devices", type=int, default=1, help="devices running in parallel")
    p.add_argument("--check", action="store_true",
                   help="also compare the plan with this grid's finished runs in MLflow "
                   "(planned vs measured time, overhead per run): run it on a pilot")
    args = p.parse_args(argv)
    if args.timings and args.seconds_per_iter:
        p.error("give --timings or --seconds-per-iter, not both")
    if args.seconds_per_run < 0 or args.devices < 1:
        p.error("--seconds-per-run must be >= 0 and --devices >= 1")
    if args.seconds_per_iter is not None and not args.seconds_per_iter > 0:  # NaN too
        raise ConfigError(f"`--seconds-per-iter`: a step time must be greater than 0 (got "
                          f"{args.seconds_per_iter}); measure it with bench_throughput, or "
                          "give --timings")
    cfg = resolve_config(args)
    from metalr_bench.benchmark.planning.plan import StepTimings, format_plan, plan_rows

    timings = None
    if args.timings:
        timings = StepTimings.from_files(args.timings, per_run_s=args.seconds_per_run)
    elif args.seconds_per_iter:
        timings = StepTimings(uniform_s_per_iter=args.seconds_per_iter,
                              uniform_batch=cfg.batch_size, per_run_s=args.seconds_per_run,
                              device=f"{args.seconds_per_iter:g} s/iteration")
    if args.check and timings is None:
        p.error("--check compares planned with measured time: give --timings or "
                "--seconds-per-iter")
    print(format_plan(cfg, plan_rows(cfg, timings), timings, devices=args.devices))
    if args.check and timings is not None:
        from metalr_bench.benchmark.planning.check import check_rows, format_check
        from metalr_bench.benchmark.tracking.client import absolute_tracking_uri
        from mlflow import MlflowClient

        uri = absolute_tracking_uri(cfg.tracking_uri)
        print()
        print(format_check(cfg, check_rows(cfg, timings, MlflowClient(uri)), uri))
    return 0


@contextlib.contextmanager
def quiet_progress(quiet: bool) -> Iterator[None]:
    """``--no-progress``: also silence the bars the stages cannot be told about (a dataset's
    decode and download bars live below the benchmark) through tqdm's own ``TQDM_DISABLE``; set
    in the environment, so spawned local workers inherit it. Restored afterwards (``main`` may
    be called in-process, by tests or a notebook)."""
    if not quiet:
        yield
        return
    import os

    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    # MLflow's INFO lines when it creates a new store ("Creating initial MLflow database
    # tables...", "Updating database tables") are progress too
    db_log = logging.getLogger("mlflow.store.db.utils")
    level = db_log.level
    db_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        db_log.setLevel(level)
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def warnings_as_lines() -> contextlib.AbstractContextManager[None]:
    """The suite's warnings as one line each while the CLI runs (:mod:`..warning_lines`; local
    workers and Ray tasks install the same, so theirs read the same)."""
    from metalr_bench.benchmark.warning_lines import warnings_as_lines as lines

    return lines()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings_as_lines():
        return _main(argv)


def _main(argv: list[str]) -> int:
    handlers = {"list": cmd_list, "plan": cmd_plan, "pretrain": cmd_pretrain,
                "replay-metrics": cmd_replay, "report": cmd_report, "race": cmd_race}
    try:
        if argv and argv[0] in handlers:
            return handlers[argv[0]](argv[1:])
        return cmd_run(argv)
    except ConfigError as exc:  # also preflight.InputError: bad files, servers, parameters
        print(f"run-benchmark: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        tracking = sys.modules.get("metalr_bench.benchmark.tracking.retry")
        if tracking is None or not isinstance(exc, tracking.TrackingError):
            raise
        print(f"run-benchmark: error: {' '.join(str(exc).split())}. The run stopped; finished "
              "cells are in MLflow and the interrupted one keeps its last epoch's checkpoint: "
              "once the tracking server answers again, run the same command to resume",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt as exc:
        from metalr_bench.benchmark.running.signals import exit_code_for, interrupted_message

        print(interrupted_message(exc), file=sys.stderr)
        return exit_code_for(exc)


def cmd_replay(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run-benchmark replay-metrics",
                                description=SUBCOMMANDS["replay-metrics"])
    p.add_argument("files", nargs="+", help="JSONL files from <output_dir>/unlogged-metrics/")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = p.parse_args(argv)
    from pathlib import Path

    from metalr_bench.benchmark.tracking.reach import TrackingURIError, check_tracking
    from metalr_bench.benchmark.tracking.retry import (
        UnloggedFileError,
        read_unlogged,
        replay_unlogged,
    )

    # every file read (and the tracking URI checked) before the store is opened: a typo used to
    # leave a traceback and a new ./mlflow.db behind
    try:
        batches = {f: read_unlogged(Path(f)) for f in args.files}
        check_tracking(args.tracking_uri)
    except (UnloggedFileError, TrackingURIError) as exc:
        raise ConfigError(str(exc)) from None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    for f, metrics in batches.items():
        n = replay_unlogged(Path(f), client, metrics)
        print(f"{f}: {n} metric(s) logged")
    return 0


def cmd_race(argv: list[str]) -> int:
    """`run-benchmark race`: the config's flags plus the race's own (the module
    :mod:`..racing.orchestration` says what it does); stage lines on stderr, the summary on stdout."""
    p = _run_parser()
    p.prog = "run-benchmark race"
    p.description = (SUBCOMMANDS["race"] + ". Per dataset: one Optuna study whose first choice "
                     "is the strategy, then that strategy's own search space (the grid's), "
                     "Hyperband-pruned on the per-epoch validation metric; then the best "
                     "configuration of each of the top k strategies on 5 seeds (the config's "
                     "seeds when it sets them), paired tests with Holm's correction against the "
                     "best, the compute spent next to `run-benchmark plan`'s price of the full "
                     "grid, and the winner (chosen on validation) logged as an MLflow model. "
                     "A killed race re-run with the same command continues the same study.")
    p.epilog = ("e.g. run-benchmark race --config configs/medmnist-real3.yaml --n-trials 60 "
                "--register pick --executor local --workers 2  (--sampler and --pruner are "
                "refused: the race is one TPE study per dataset, Hyperband-pruned; --tune is "
                "ignored with a warning; at least 2 strategies)")
    for action in p._actions:  # the grid's --n-trials means something else here
        if "--n-trials" in action.option_strings:
            action.help = ("trials of the race's one study per dataset (default: "
                           "4 per strategy); raising it later extends the same study")
        if "--workers-per-study" in action.option_strings:
            action.help = ("with --executor local/ray: workers sharing the race's study "
                           "(default: the executor's workers, --workers)")
    g = p.add_argument_group("race")
    g.add_argument("--top-k", type=int, default=3, metavar="K",
                   help="strategies confirmed on seeds, best first (default 3)")
    g.add_argument("--register", metavar="NAME",
                   help="register the winner's model in the MLflow Model Registry as NAME "
                   "(NAME-<dataset> per dataset when the config has several)")
    g.add_argument("--min-epochs", type=int, default=1, metavar="E",
                   help="Hyperband's smallest budget: epochs every trial gets (default 1)")
    g.add_argument("--trial-epochs", type=int, metavar="E",
                   help="epochs of a search trial, Hyperband's largest budget (config "
                   "`tune.epochs`, else `epochs`); --epochs sets the confirmation runs'")
    g.add_argument("--timings", nargs="+", metavar="JSON",
                   help="bench_throughput --json files: price the full grid as `run-benchmark "
                   "plan --timings` does (default: at the race's own measured time per iteration)")
    g.add_argument("--seconds-per-iter", type=float, metavar="S",
                   help="instead of --timings: one training-step time for the grid's price")
    args = p.parse_args(argv)
    # the grid's tuning flags: a race is one multivariate-TPE study per dataset, Hyperband-
    # pruned; asking for another pruner or sampler is refused rather than silently ignored
    if args.pruner is not None:
        raise ConfigError(f"`--pruner {args.pruner}`: the race prunes with Hyperband (its "
                          "smallest budget is `--min-epochs`); drop --pruner")
    if args.sampler is not None:
        raise ConfigError(f"`--sampler {args.sampler}`: the race samples with multivariate TPE "
                          "over the strategy and its space; drop --sampler")
    if args.tune:
        print("run-benchmark race: --tune ignored: a race always tunes", file=sys.stderr)
    if args.timings and args.seconds_per_iter:
        p.error("give --timings or --seconds-per-iter, not both")
    if args.trial_epochs is not None and args.trial_epochs < 1:
        p.error(f"--trial-epochs {args.trial_epochs}: a trial trains at least 1 epoch")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    n_trials, args.n_trials = args.n_trials, None  # the race's, not `tune.n_trials`
    cfg = resolve_config(args)
    if args.trial_epochs is not None:
        cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(
            update={"epochs": args.trial_epochs})})
    # 5 confirmation seeds unless the flags or the YAML file set them
    seeds_given = args.seeds is not None or (
        args.config is not None and "seeds" in load_config(args.config).model_fields_set)
    from metalr_bench.benchmark.planning.plan import StepTimings
    from metalr_bench.benchmark.racing.formatting import format_race
    from metalr_bench.benchmark.racing.orchestration import run_race
    from metalr_bench.benchmark.racing.settings import DEFAULT_SEEDS, RaceSettings
    from metalr_bench.benchmark.tuning.studies import storage_url

    timings = None
    if args.timings:
        timings = StepTimings.from_files(args.timings)
    elif args.seconds_per_iter:
        timings = StepTimings(uniform_s_per_iter=args.seconds_per_iter,
                              uniform_batch=cfg.batch_size,
                              device=f"{args.seconds_per_iter:g} s/iteration")
    settings = RaceSettings(n_trials=n_trials, top_k=args.top_k, min_epochs=args.min_epochs,
                            register=args.register, timings=timings,
                            seeds=None if seeds_given else DEFAULT_SEEDS)

    def announce(rcfg: Any, specs: list[Any]) -> None:
        print(f"run-benchmark race: {len(specs)} dataset(s) x {len(rcfg.strategies)} "
              f"strateg(ies), {rcfg.tune.n_trials} trial(s) per dataset of up to "
              f"{rcfg.tune.epochs or rcfg.epochs} epoch(s) (Hyperband from {args.min_epochs}), "
              f"objective validation {rcfg.tune.metric}; then the top {args.top_k} on "
              f"{len(rcfg.seeds)} seed(s) x {rcfg.epochs} epoch(s); model {rcfg.model.arch}, "
              f"device {rcfg.resolved_device()}, tracking {rcfg.tracking_uri}, studies "
              f"{storage_url(rcfg)}", file=sys.stderr, flush=True)

    with quiet_progress(args.no_progress):
        outcome = run_race(cfg, settings, progress=not args.no_progress, announce=announce)
    print()
    print(format_race(outcome.races))
    print(f"\nSummary: {outcome.summary_path}. MLflow: experiment {cfg.name!r}, race run "
          f"{outcome.parent_run_id}. " + mlflow_ui_hint(cfg.tracking_uri, outcome.experiment_id))
    if cfg.report:  # the report of the race's run: its answers marked as races
        from metalr_bench.reports.build import report_after_benchmark

        report = report_after_benchmark(cfg, outcome.parent_run_id,
                                        progress=not args.no_progress)
        if report is not None:
            print(f"Report: {report.html} (notebook, results.csv/.parquet alongside)")
    for line in outcome.failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if outcome.failed else 0


def cmd_report(argv: list[str]) -> int:
    # imported here: the reports pull in papermill and nbconvert, which a run does not need
    from metalr_bench.benchmark.tracking.reach import TrackingURIError, check_tracking
    from metalr_bench.reports.cli import _parser
    from metalr_bench.reports.cli import cmd_report as report

    # the tracking server answers, as a run checks it (3 s): `report` used to hang on one
    # that is down (urllib3's retries; killed at 120 s with nothing printed)
    try:
        check_tracking(_parser().parse_args(argv).tracking_uri)
    except TrackingURIError as exc:
        raise ConfigError(str(exc)) from None
    return report(argv)


if __name__ == "__main__":
    raise SystemExit(main())
