"""Everything MLflow: one run lifecycle for every run the suite writes.

Holds: ``client`` (``Tracker``: runs started, beating and ended through ``Tracker.run``, every
call retried; ``MetricsLogger`` batches metrics), ``tags`` (the tag schema as constants),
``retry`` (backoff, metrics saved when the server stays away), ``heartbeat`` and ``liveness``
(owner tags, dead vs live RUNNING runs), ``server`` (an ``mlflow server`` for several workers).

May import: mlflow and the standard library only: no torch, no training, no config, so the
reports and the CLI's light commands read MLflow without loading torch (import-linter checks
it).
"""
