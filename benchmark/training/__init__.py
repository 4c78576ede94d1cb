"""Training one cell: the one cell builder and the one training loop.

Holds: ``cell`` (the cell builder: ``build_parts``, model, weights, placement, layer groups,
strategy, trainer, and ``build_cell``, the same for a config's grid cell;
``train_cell``; ``DataCache``; ``CellResult``), ``trainer`` (epochs, evaluation, checkpoint
selection, PreciseBN, drift), ``metrics``, ``checkpoint`` (per-epoch state for exact resume),
``faults`` (divergence, out-of-memory), ``pretrain`` (the pre-training stage and
``starting_weights``) and ``transferability`` (per-layer transferability T of a finished run).

May import: tracking (pre-training logs its run), models, config, strategies, datasets; never
running, tuning, planning, reports or cli.
"""
