"""Time one MetaLR iteration against one full fine-tuning iteration (same model, batch, size).

    python -m metalr_bench.benchmark.perf.bench_step --arch resnet18 --size 28 64 --batch 128 \\
        --device cuda --amp --channels-last

Both modes run the real code paths, built as a run builds them (:func:`training.cell.build_parts`)
and stepped through :meth:`Trainer.train_step`: full FT is the trainer's default step
(zero_grad, forward, backward, optimizer step); MetaLR is :meth:`MetaLR.train_step` (train
forward/backward, look-ahead forward/backward on a meta batch drawn by the trainer, LR update,
optimizer step). The floor for MetaLR is one extra forward/backward, so a
ratio near 2x (CPU, where the optimizer step is cheap) or below (where the optimizer and launch
overheads weigh more) is what an exact first-order implementation can reach.

Time: median of ``--iters`` iterations after ``--warmup`` (the mean with ``--meta-interval`` > 1),
synchronising the device after each; the two modes alternate iteration by iteration (a shared
CPU's load hits both alike).
Memory: on CUDA, ``torch.cuda.max_memory_allocated`` of each mode run alone (model, grads,
optimizer state and activations: everything the caching allocator hands out).
On CPU, torch has no allocator statistics, so each mode runs in its own subprocess and we report
its peak RSS (``VmHWM``) and the peak RSS *above* the RSS measured just before the first
step (which removes the interpreter, torch and the input batches); the second is the figure to
compare, and it still includes allocator slack.

Prints one human-readable line per size and, last, one JSON line of all figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from metalr_bench.benchmark.models.zoo import get_card
from metalr_bench.benchmark.perf.bench_throughput import random_bundle
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.trainer import Trainer, TrainerSettings
from metalr_bench.strategies.core.base import TrainSettings
from metalr_bench.strategies.core.optim import optimizer_names

MODES = ("full", "metalr")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM). Not ``ru_maxrss``: that one survives exec and
    so starts at the parent's RSS in a subprocess."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Bench:
    """One model/batch setup; ``step(mode)`` runs one iteration of that mode.

    Each mode is a real run's trainer, built by the one cell builder
    (:func:`training.cell.build_parts`), and an iteration is :meth:`Trainer.train_step`, the step
    every run takes: the default step for full fine-tuning, MetaLR's own step (its meta batch
    drawn by the trainer from the held-out meta split) for MetaLR. Only the training batch is
    fixed (resident on the device), so the figure is the step and not the data loading.
    """

    def __init__(self, args: argparse.Namespace, size: int) -> None:
        self.device = torch.device(args.device)
        self.args = args
        self.meta = args.meta_batch or args.batch  # MetaLR's meta_batch_size (default: batch)
        # the meta split (20 % of train, drop_last) must hold at least one meta batch
        n_train = max(args.batch, 5 * self.meta + self.meta)
        self.bundle = random_bundle(size, n_train, channels=args.in_channels)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        g = torch.Generator().manual_seed(1)
        shape = (args.batch, args.in_channels, size, size)
        self.batch = (torch.randn(shape, generator=g).to(self.device, memory_format=fmt),
                      torch.randint(0, 2, (args.batch,), generator=g).to(self.device))
        self.settings = TrainSettings(lr=1e-3, optimizer=args.optimizer, weight_decay=1e-4)
        self.trainer_settings = TrainerSettings(
            epochs=1, batch_size=args.batch, device=args.device, amp=args.amp,
            channels_last=args.channels_last, augment=False, precise_bn=False,
        )
        self.meta_interval = args.meta_interval
        self.state: dict[str, Trainer] = {}
        self.steps: dict[str, int] = {}

    def setup(self, mode: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)  # both modes start from the same weights
        params = ({"head_pin_epochs": 0, "meta_interval": self.meta_interval,
                   "meta_batch_size": self.meta} if mode == "metalr" else {})
        built = build_parts(self.args.arch, self.args.in_channels, 2, mode, params, self.settings,
                      bundle=self.bundle, trainer_settings=self.trainer_settings)
        assert built.trainer is not None
        built.strategy.set_train_mode(built.trainer.model)
        self.state[mode] = built.trainer
        self.steps[mode] = 0

    def step(self, mode: str) -> None:
        x, y = self.batch
        self.state[mode].train_step(x, y, epoch=0, step=self.steps[mode])
        self.steps[mode] += 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_modes(self, warmup: int, iters: int) -> dict[str, float]:
        """Median seconds per iteration of each mode (mean when meta_interval > 1), the modes
        interleaved iteration by iteration so that a change in machine load hits both alike."""
        for mode in MODES:
            self.setup(mode)
        for _ in range(warmup):
            for mode in MODES:
                self.step(mode)
        self.sync()
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(iters):
            for mode in MODES:
                t0 = time.perf_counter()
                self.step(mode)
                self.sync()
                times[mode].append(time.perf_counter() - t0)
        self.state.clear()
        # k > 1 alternates cheap and meta iterations: the mean is the amortised cost
        stat = statistics.median if self.meta_interval == 1 else statistics.fmean
        return {m: stat(t) for m, t in times.items()}

    def cuda_peak_mb(self, mode: str, iters: int = 3) -> float:
        """Peak allocated CUDA memory of ``mode`` alone (model, grads, state, activations)."""
        self.state.clear()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.setup(mode)
        for _ in range(iters):
            self.step(mode)
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.state.clear()
        return peak


def _probe_cpu_memory(args: argparse.Namespace, size: int, mode: str) -> dict[str, float]:
    """Run ``mode`` alone in a fresh interpreter; return its RSS figures in MB."""
    cmd = [sys.executable, "-m", "metalr_bench.benchmark.perf.bench_step", "--_probe", mode,
           "--arch", args.arch, "--size", str(size), "--batch", str(args.batch),
           "--in-channels", str(args.in_channels), "--optimizer", args.optimizer,
           "--threads", str(args.threads), "--meta-interval", str(args.meta_interval),
           "--meta-batch", str(args.meta_batch or args.batch),
           "--warmup", "1", "--iters", "3"]
    if args.channels_last:
        cmd.append("--channels-last")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _probe(args: argparse.Namespace) -> None:
    bench = Bench(args, args.size[0])
    bench.setup(args._probe)
    before = _rss_mb()
    for _ in range(args.warmup + args.iters):
        bench.step(args._probe)
    peak = _peak_rss_mb()
    print(json.dumps({"rss_before_mb": before, "peak_rss_mb": peak,
                      "peak_above_start_mb": peak - before}))


def _arch(name: str) -> str:
    try:
        get_card(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m metalr_bench.benchmark.perf.bench_step",
        description="Time one MetaLR iteration against one full fine-tuning iteration.",
    )
    p.add_argument("--arch", default="resnet18", type=_arch,
                   help="a zoo model or timm:<name> (see `run-benchmark list`)")
    p.add_argument("--size", type=int, nargs="+", default=[28, 64], help="input sizes (px)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--optimizer", default="adam", choices=optimizer_names())
    p.add_argument("--meta-interval", type=int, default=1,
                   help="MetaLR's meta_interval: one meta-step every k iterations; with k > 1 "
                        "the figure is the mean (the amortised cost), not the median")
    p.add_argument("--meta-batch", type=int, default=None,
                   help="MetaLR's meta_batch_size: images per meta batch (default: --batch)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    p.add_argument("--_probe", choices=MODES, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._probe:
        _probe(args)
        return []
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    rows = []
    for size in args.size:
        bench = Bench(args, size)
        t = bench.time_modes(args.warmup, args.iters)
        t_full, t_meta = t["full"], t["metalr"]
        m_full = m_meta = None
        if bench.device.type == "cuda":
            m_full, m_meta = bench.cuda_peak_mb("full"), bench.cuda_peak_mb("metalr")
        row: dict[str, Any] = {
            "arch": args.arch, "size": size, "batch": args.batch, "device": args.device,
            "device_name": (torch.cuda.get_device_name(bench.device)
                            if bench.device.type == "cuda" else "cpu"),
            "threads": torch.get_num_threads(), "amp": args.amp,
            "channels_last": args.channels_last, "optimizer": args.optimizer,
            "meta_interval": args.meta_interval, "meta_batch": args.meta_batch or args.batch,
            "full_s": t_full, "metalr_s": t_meta, "time_ratio": t_meta / t_full,
        }
        if m_full is not None and m_meta is not None:
            row |= {"memory_method": "cuda.max_memory_allocated", "full_peak_mb": m_full,
                    "metalr_peak_mb": m_meta, "memory_ratio": m_meta / m_full}
        elif not args.no_memory:
            full = _probe_cpu_memory(args, size, "full")
            meta = _probe_cpu_memory(args, size, "metalr")
            row |= {
                "memory_method": "peak RSS (VmHWM) per subprocess; ratio of the peak above "
                                 "the RSS before the first step",
                "full_peak_rss_mb": full["peak_rss_mb"], "metalr_peak_rss_mb": meta["peak_rss_mb"],
                "full_peak_above_start_mb": full["peak_above_start_mb"],
                "metalr_peak_above_start_mb": meta["peak_above_start_mb"],
                "memory_ratio": meta["peak_above_start_mb"] / full["peak_above_start_mb"],
                "rss_ratio": meta["peak_rss_mb"] / full["peak_rss_mb"],
            }
        mem = f", memory x{row['memory_ratio']:.2f}" if "memory_ratio" in row else ""
        every = f", MetaLR meta-step every {args.meta_interval} it (mean)" if (
            args.meta_interval > 1) else ""
        if args.meta_batch and args.meta_batch != args.batch:
            every += f", meta batch {args.meta_batch}"
        print(f"{args.arch} {size}px batch {args.batch} on {row['device_name']}{every}: "
              f"full FT {t_full * 1e3:.1f} ms/it, MetaLR {t_meta * 1e3:.1f} ms/it, "
              f"time x{t_meta / t_full:.2f}{mem}", flush=True)
        rows.append(row)
    print(json.dumps(rows if len(rows) != 1 else rows[0]))
    return rows


if __name__ == "__main__":
    main()
