"""Report notebooks built from the MLflow store alone.

Holds: ``templates/benchmark_report.py`` (the jupytext notebook papermill executes),
``results`` (MLflow runs -> tidy tables), ``stats`` (CIs, paired tests, Friedman + Nemenyi),
``tables``, ``figures``, ``transferability`` (learned LRs against per-layer transferability,
Spearman), ``build`` (papermill + HTML) and ``cli`` (`run-benchmark report`).

May import: mlflow, pandas, scipy, matplotlib, papermill and the torch-free tracking layer
(``benchmark.tracking``); never torch, the trainer, the strategies or the datasets
(import-linter checks it), so a report builds on a machine without a GPU stack.
"""
