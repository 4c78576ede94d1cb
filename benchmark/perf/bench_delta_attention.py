"""DELTA's one-off attention pass: seconds to weigh every channel of every feature map.

    python -m metalr_bench.benchmark.perf.bench_delta_attention --arch resnet18 --size 28
    python -m metalr_bench.benchmark.perf.bench_delta_attention --device cuda --size 224

Why a script: DELTA measures, once per run, the loss rise when each channel of each feature map
is removed (ResNet-18: 64 + 128 + 256 + 512 = 960 channels) on ``attention_batches`` training
batches. It was the strategy's largest cost on a CPU (BENCHMARKS.md), and its speed depends on
the machine, so the figure belongs in BENCHMARKS.md, not in a timed test. The pass is timed as
the strategy runs it (:meth:`Delta.compute_attention`: the head fitted on frozen features, then
the ablations), with the defaults' batches (2 × ``--batch-size``), after one untimed warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch
import torch.nn.functional as F
from metalr_bench.benchmark.perf.bench_throughput import device_name, random_bundle
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.trainer import TrainerSettings, seed_everything
from metalr_bench.strategies.core.base import TrainSettings


def measure(arch: str, size: int, batch_size: int, batches: int, device: str,
            repeats: int) -> dict[str, float | int | str]:
    seed_everything(0)
    bundle = random_bundle(size, batch_size * batches, channels=1)
    built = build_parts(arch, 1, 2, "delta", {"attention": True, "attention_batches": batches},
                        TrainSettings(), bundle=bundle, device=device,
                        trainer_settings=TrainerSettings(epochs=1, batch_size=batch_size,
                                                         augment=False, precise_bn=False))
    delta = built.strategy
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch_size, 1, size, size, generator=g).to(device),
             (torch.arange(batch_size) % 2).to(device)) for _ in range(batches)]
    weights = delta.compute_attention(data, F.cross_entropy, contextlib.nullcontext)  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        delta.compute_attention(data, F.cross_entropy, contextlib.nullcontext)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    channels = sum(len(w) for w in weights)
    return {"arch": arch, "size": size, "batch_size": batch_size, "batches": batches,
            "channels": channels, "device": device, "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "seconds": min(times), "host": platform.node()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=2, help="attention_batches (default 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes; the fastest is kept")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = measure(args.arch, args.size, args.batch_size, args.batches, args.device,
                  args.repeats)
    print(f"delta attention: {out['arch']} at {out['size']} px, {out['channels']} channels x "
          f"{out['batches']} batch(es) of {out['batch_size']} on {out['device_name']} "
          f"({out['threads']} thread(s)): {out['seconds']:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
