"""Every figure BENCHMARKS.md asks of a GPU, in one command, written as Markdown to paste.

    python -m metalr_bench.benchmark.perf.gpu_figures --out gpu-figures

Why: the GPU figures (MetaLR's step time and memory against full fine-tuning with bf16 and
channels_last, training throughput per strategy at 28 and 64 px with and without
``torch.compile``, and the paper grid priced with those step times) come from three tools and
half a dozen invocations. A GPU is often lent for a short while; one command that runs them all
with the settings BENCHMARKS.md quotes, and writes what it measured next to the exact commands,
leaves nothing to reconstruct by hand.

Writes under ``--out``: ``step.json`` (bench_step rows), ``t<size>.json`` and
``t<size>-compile.json`` (bench_throughput rows, the input of ``run-benchmark plan --timings``),
``plan.txt`` and ``figures.md``. Runs on CPU too (tests use it with a tiny model).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import shlex
from pathlib import Path
from typing import Any

import torch
from metalr_bench.benchmark import cli
from metalr_bench.benchmark.perf import bench_step, bench_throughput

#: the public MetaLR implementation's speed on an RTX A6000 (ResNet-18, 64 px, batch 128)
PUBLIC_S_PER_ITER = (0.37, 0.40)


def _quiet(fn: Any, argv: list[str]) -> tuple[Any, str]:
    """Run a tool's ``main(argv)``, keeping what it prints (for the log, not the console)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            result = fn(argv)
        except SystemExit as exc:  # argparse's error exit: keep going, report the code
            result = exc.code
    return result, out.getvalue()


def _cmd(module: Any, argv: list[str]) -> str:
    return f"python -m {module.__name__} " + " ".join(map(shlex.quote, argv))


def run(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = args.device.startswith("cuda")
    commands: list[str] = []
    log: list[str] = []

    def step(module: Any, argv: list[str]) -> Any:
        commands.append(_cmd(module, argv))
        print(f"[gpu_figures] {commands[-1]}", flush=True)
        result, text = _quiet(module.main, argv)
        log.append(f"$ {commands[-1]}\n{text}")
        return result

    common = ["--device", args.device, "--iters", str(args.iters), "--warmup", str(args.warmup)]
    step_argv = ["--arch", args.model, "--size", *map(str, args.sizes), "--batch",
                 str(args.batch), *common]
    step_argv += ["--amp", "--channels-last"] if gpu else ["--no-memory"]
    step_rows = step(bench_step, step_argv)
    half = step(bench_step, [*step_argv, "--meta-batch", str(args.batch // 2)])
    step_rows = list(step_rows) + list(half)
    (out / "step.json").write_text(json.dumps(step_rows, indent=1))

    throughput: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    for size in args.sizes:
        for compiled in (False, True) if args.compile else (False,):
            path = out / f"t{size}{'-compile' if compiled else ''}.json"
            argv = ["--model", args.model, "--size", str(size), "--batch-size", str(args.batch),
                    *common, "--json", str(path), *(["--compile"] if compiled else []),
                    *(["--strategies", *args.strategies] if args.strategies else [])]
            step(bench_throughput, argv)
            throughput[(size, compiled)] = json.loads(path.read_text())

    plan_argv = ["plan", "--config", args.config, "--timings",
                 *(str(out / f"t{s}.json") for s in args.sizes), "--devices", str(args.devices)]
    commands.append("run-benchmark " + " ".join(map(shlex.quote, plan_argv)))
    code, plan_text = _quiet(cli.main, plan_argv)
    (out / "plan.txt").write_text(plan_text)
    if code != 0:
        plan_text = f"(run-benchmark plan exited {code}: see the command above)\n{plan_text}"

    (out / "log.txt").write_text("\n".join(log))
    md = figures_markdown(args, step_rows, throughput, plan_text, commands)
    (out / "figures.md").write_text(md)
    print(md)
    return out / "figures.md"


def figures_markdown(args: argparse.Namespace, step_rows: list[dict[str, Any]],
                     throughput: dict[tuple[int, bool], list[dict[str, Any]]], plan_text: str,
                     commands: list[str]) -> str:
    name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
            else step_rows[0]["device_name"] if step_rows else args.device)
    lines = [f"### {name}, {args.model}, batch {args.batch} "
             f"({datetime.date.today().isoformat()}, torch {torch.__version__})", "",
             "```bash", *commands, "```", "",
             "**MetaLR step against full fine-tuning** (bench_step: median of "
             f"{args.iters} iterations after {args.warmup})", "",
             "| size | meta batch | bf16 | channels_last | full FT ms/it | MetaLR ms/it | time "
             "ratio | memory ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in step_rows:
        mem = f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else "-"
        lines.append(f"| {r['size']} px | {r['meta_batch']} | {r['amp']} | {r['channels_last']} "
                     f"| {r['full_s'] * 1e3:.1f} | {r['metalr_s'] * 1e3:.1f} | "
                     f"{r['time_ratio']:.2f} | {mem} |")
    lines += ["", f"Public MetaLR code: {PUBLIC_S_PER_ITER[0]:.2f}-{PUBLIC_S_PER_ITER[1]:.2f} "
              "s/iteration "
              "(RTX A6000, ResNet-18, 64 px, batch 128).", "",
              "**Training throughput per strategy** (bench_throughput; the eval row is forward "
              "only, batch 256)", "",
              "| strategy | size | compile | ms/iter | images/s |", "|---|---|---|---|---|"]
    for (size, compiled), rows in sorted(throughput.items()):
        for r in rows:
            lines.append(f"| {r['strategy']} | {size} px | {compiled} | "
                         f"{r['ms_per_iter']:.1f} | {r['images_per_s']:.0f} |")
    lines += ["", "**The grid priced with these step times** (`run-benchmark plan`)", "",
              "```", plan_text.strip(), "```", ""]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_figures", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-figures", help="folder for the JSON, plan and Markdown")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--sizes", type=int, nargs="+", default=[28, 64])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--strategies", nargs="+", default=None,
                   help="bench_throughput's strategies (default: all five)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile throughput rows")
    p.add_argument("--config", default="configs/medmnist.yaml", help="the grid to price")
    p.add_argument("--devices", type=int, default=1, help="devices the grid will run on")
    return p


def main(argv: list[str] | None = None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
