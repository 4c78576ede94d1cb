"""The report's cost table: what each strategy costs and how much of the network it trains.

Per (dataset, strategy), mean over seeds: trainable parameters (run param
``n_trainable_params``; the number a parameter-efficient method is chosen for), time per epoch,
the one-off seconds beside it (metric ``oneoff_time_s``: work a strategy does once per run, kept
out of the time per epoch: the probe fit of LP-FT, WiSE-FT and linear_probe, WiSE-FT's α sweep
with its BatchNorm re-estimation, DELTA's attention pass), peak memory and total time. A column is left out when no run logged it (runs of older versions
have no ``n_trainable_params``), so an old store still renders.
"""

from __future__ import annotations

import pandas as pd

#: (source column, shown name), in the order shown
COLUMNS = (("param.n_trainable_params", "trainable parameters"),
           ("mean_epoch_time_s", "wall time per epoch (s)"),
           ("oneoff_time_s", "one-off time per run (s)"),
           ("peak_memory_mb", "peak memory (MiB)"),
           ("total_time_s", "total time per run (s)"))


def cost_table(results: pd.DataFrame) -> pd.DataFrame:
    """``dataset, strategy`` and the cost columns present, mean over seeds (parameters as a
    whole number: they do not vary over seeds)."""
    present = [(c, name) for c, name in COLUMNS if c in results and results[c].notna().any()]
    if results.empty or not present:
        return pd.DataFrame()
    frame = results[["dataset_key", "strategy_label"]].copy()
    for c, _ in present:
        frame[c] = pd.to_numeric(results[c], errors="coerce")
    out = frame.groupby(["dataset_key", "strategy_label"], sort=True).mean().reset_index()
    out = out.rename(columns={"dataset_key": "dataset", "strategy_label": "strategy",
                              **dict(present)})
    for c, name in present:
        out[name] = out[name].round(0).astype("Int64") if c.startswith("param.") else \
            out[name].round(2)
    return out
