"""Speed benchmarks (scripts, not tests): figures for BENCHMARKS.md.

Holds: ``bench_step`` (one MetaLR iteration vs one full fine-tuning iteration), ``bench_throughput``
(images/s of every strategy, the plan's step times) and ``gpu_figures`` (every GPU figure in one
command). Each builds its runs with the one cell builder and steps through the trainer, so a
figure times what a run does.

May import: everything below it, the CLI included (``gpu_figures`` drives `run-benchmark plan`);
nothing imports perf.
"""
