"""What a grid will cost before it runs (`run-benchmark plan`), and a pilot's check.

Holds: ``plan`` (runs, training iterations and forward passes counted as the trainer does
them, priced with measured step times) and ``check`` (planned vs measured time of a pilot's
finished runs in MLflow).

May import: training (its settings), tracking, config, strategies, datasets; never running.
"""
