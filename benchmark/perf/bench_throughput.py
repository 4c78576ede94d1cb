"""Training throughput per strategy: images/s and ms/iteration through the real trainer step.

    python -m metalr_bench.benchmark.perf.bench_throughput --size 64 --batch-size 128 --device cuda
    python -m metalr_bench.benchmark.perf.bench_throughput --device cpu --batch-size 32 --iters 10

Why a script and not a test: speed depends on the machine; the numbers belong in BENCHMARKS.md
next to the public MetaLR code's 0.37-0.40 s/iteration (RTX A6000, ResNet-18, 64 px, batch 128).

Each strategy is built exactly as the runner builds it (model, layer groups, strategy, Trainer
with its device-resident loader and GPU-side augmentation); the timed loop is the trainer's own
per-batch step (``Trainer.train_step``: the strategy's step or the default one, through the
compiled forward with ``--compile``), so MetaLR's meta step,
L2-SP's penalty and frozen layers all count. Warm-up iterations (cuDNN autotune, compile) are not
timed; timing ends with a device synchronise.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np
import torch
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.trainer import Trainer, TrainerSettings, seed_everything
from metalr_bench.datasets.core.base import DatasetBundle, Split, TaskType
from metalr_bench.strategies.core.base import TrainSettings
from metalr_bench.strategies.core.registry import default_strategies


def random_bundle(size: int, n_train: int, channels: int = 1, n_classes: int = 2,
                  n_val: int = 64) -> DatasetBundle:
    """MedMNIST-shaped random data: speed does not depend on pixel values."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(
            images=torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
            labels=torch.arange(n) % n_classes,
            groups=np.arange(n),
        )

    return DatasetBundle(name="throughput", task=TaskType.BINARY if n_classes == 2
                         else TaskType.MULTICLASS, class_names=[str(i) for i in range(n_classes)],
                         in_channels=channels, image_size=size, train=split(n_train),
                         val=split(n_val), test=split(64))


def _trainer(arch: str, bundle: DatasetBundle, strategy: str, settings: TrainSettings,
             trainer_settings: TrainerSettings) -> Trainer:
    """A run's trainer, built by the one cell builder (what a run trains is what is timed)."""
    built = build_parts(arch, bundle.in_channels, bundle.num_outputs, strategy, {}, settings,
                  bundle=bundle, trainer_settings=trainer_settings)
    assert built.trainer is not None
    return built.trainer


def measure(strategy_name: str, *, arch: str, size: int, batch_size: int, iters: int, warmup: int,
            device: str, amp: bool, channels_last: bool, compile: bool) -> dict[str, Any]:
    seed_everything(0)
    # enough training images for warmup + iters batches, plus MetaLR's held-out meta split
    bundle = random_bundle(size, int(batch_size * (warmup + iters + 1) * 1.3) + batch_size)
    trainer_settings = TrainerSettings(epochs=1, batch_size=batch_size, device=device, amp=amp,
                                       channels_last=channels_last, compile=compile, augment=True)
    settings = TrainSettings(lr=1e-3, optimizer="adam", weight_decay=1e-4, momentum=0.9,
                             epochs=1, steps_per_epoch=warmup + iters)
    trainer = _trainer(arch, bundle, strategy_name, settings, trainer_settings)
    trainer.strategy.set_train_mode(trainer.model)
    dev = trainer.device

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    batches = iter(trainer.train_loader)
    t0 = 0.0
    for step in range(warmup + iters):
        if step == warmup:
            sync()
            t0 = time.perf_counter()
        x, y = next(batches)
        loss = trainer.train_step(x, y, epoch=0, step=step)
    sync()
    elapsed = time.perf_counter() - t0
    return {
        "strategy": strategy_name, "arch": arch, "size": size, "batch_size": batch_size,
        "device": device, "amp": amp, "channels_last": channels_last, "compile": compile,
        "iters": iters, "s_per_iter": elapsed / iters, "ms_per_iter": 1000 * elapsed / iters,
        "images_per_s": batch_size * iters / elapsed,
        "final_loss": float(loss),
    }


def measure_eval(*, arch: str, size: int, batch_size: int, iters: int, device: str, amp: bool,
                 channels_last: bool, compile: bool) -> dict[str, Any]:
    """Forward-only cost: the trainer's own ``evaluate("val")`` over ``iters`` batches (logits,
    loss and metrics), timed after one untimed pass. ``run-benchmark plan`` prices validation,
    test and precise-BN passes with it."""
    seed_everything(0)
    bundle = random_bundle(size, 2 * batch_size, n_val=batch_size * iters)
    trainer_settings = TrainerSettings(epochs=1, batch_size=batch_size, eval_batch_size=batch_size,
                                       device=device, amp=amp, channels_last=channels_last,
                                       compile=compile)
    settings = TrainSettings(lr=1e-3, optimizer="adam", weight_decay=0.0, momentum=0.9,
                             epochs=1, steps_per_epoch=1)
    trainer = _trainer(arch, bundle, "full", settings, trainer_settings)
    trainer.evaluate("val")  # warm-up (and compile)
    t0 = time.perf_counter()
    trainer.evaluate("val")  # ends with the metrics on the host: synchronised
    elapsed = time.perf_counter() - t0
    return {
        "strategy": "eval", "arch": arch, "size": size, "batch_size": batch_size,
        "device": device, "amp": amp, "channels_last": channels_last, "compile": compile,
        "iters": iters, "s_per_iter": elapsed / iters, "ms_per_iter": 1000 * elapsed / iters,
        "images_per_s": batch_size * iters / elapsed,
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return (f"{platform.processor() or platform.machine()} "
            f"({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--strategies", nargs="+", default=None,
                   help="default: full last_k l2sp layer_decay (+ metalr when registered)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on for CUDA)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    p.add_argument("--eval-batch-size", type=int, default=256,
                   help="batch of the forward-only (evaluation) row; 0 skips it")
    p.add_argument("--json", help="also write the rows to this JSON file (input of "
                   "`run-benchmark plan --timings`)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    amp = args.amp == "on" or (args.amp == "auto" and gpu)
    cl = args.channels_last == "on" or (args.channels_last == "auto" and gpu)
    names = args.strategies or default_strategies()
    print(f"# {args.model}, {args.size} px, batch {args.batch_size}, {args.iters} timed iters "
          f"after {args.warmup} warm-up, device {device_name(args.device)}, bf16={amp}, "
          f"channels_last={cl}, compile={args.compile}, torch {torch.__version__}", flush=True)
    print(f"{'strategy':12s} {'ms/iter':>9s} {'images/s':>9s}", flush=True)
    rows = []
    for name in names:
        row = measure(name, arch=args.model, size=args.size, batch_size=args.batch_size,
                      iters=args.iters, warmup=args.warmup, device=args.device, amp=amp,
                      channels_last=cl, compile=args.compile)
        row["device_name"] = device_name(args.device)
        rows.append(row)
        print(f"{name:12s} {row['ms_per_iter']:9.1f} {row['images_per_s']:9.1f}", flush=True)
    if args.eval_batch_size:
        row = measure_eval(arch=args.model, size=args.size, batch_size=args.eval_batch_size,
                           iters=max(args.iters // 2, 2), device=args.device, amp=amp,
                           channels_last=cl, compile=args.compile)
        row["device_name"] = device_name(args.device)
        rows.append(row)
        print(f"{'eval':12s} {row['ms_per_iter']:9.1f} {row['images_per_s']:9.1f}  "
              f"(forward only, batch {args.eval_batch_size})", flush=True)
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
