"""What the user reads: the printed summary of a race (:func:`format_race`)."""

from __future__ import annotations

import math

from metalr_bench.benchmark.racing.outcome import DatasetRace


def format_race(races: list[DatasetRace]) -> str:
    """The printed summary: per dataset the search, the confirmation table, the answer, the
    winner's model and the compute."""
    out: list[str] = []
    for r in races:
        c = r.counts
        out.append(f"Race {r.dataset}: {sum(c.values())} trial(s) (complete "
                   f"{c.get('complete', 0)}, pruned {c.get('pruned', 0)}, failed "
                   f"{c.get('fail', 0)}), study {r.study_name}")
        if r.strategies:
            rung = next((row["rung"] for row in r.strategies if "rung" in row), None)
            out.append("  search, every strategy named"
                       + (f" (its best validation value within {rung} epoch(s), the rung "
                          "every strategy reached)" if rung else "") + ":")
            out.append(f"  {'strategy':16s} {'trials':>6s} {'done/pruned/failed':>18s} "
                       f"{'epochs':>6s} {'value':>7s}  what the race did")
            for row in r.strategies:
                value = f"{row['value']:.4f}" if "value" in row else "-"
                done = f"{row['complete']}/{row['pruned']}/{row['failed']}"
                out.append(f"  {row['strategy']:16s} {row['trials']:6d} {done:>18s} "
                           f"{row['epochs']:6d} {value:>7s}  {row['status']}")
        if r.error:
            out.append(f"  FAILED: {r.error}")
            continue
        if not r.table.empty:
            metric = next(k for k in r.table.columns if k.startswith("test_") and
                          k.endswith("_mean"))[:-5]
            val = next(k for k in r.table.columns if k.startswith("best_val_"))[:-5]
            out.append(f"  {'strategy':16s} {'search best':>11s} {metric + ' (mean ± std)':>24s} "
                       f"{val:>14s} {'vs best (Holm p)':>18s}")
            for _, row in r.table.iterrows():
                sd = row[f"{metric}_std"]
                score = f"{row[f'{metric}_mean']:.3f}" + ("" if math.isnan(sd) else f" ± {sd:.3f}")
                p = row.get("p_holm", math.nan)
                vs = ("best" if row["strategy"] == r.best_on_test else
                      f"{row.get('diff_vs_best', math.nan):+.3f} (p {p:.2g})"
                      if isinstance(p, float) and not math.isnan(p) else "no test")
                out.append(f"  {row['strategy']:16s} {row['search_best']:11.4f} "
                           f"{score + f' ({int(row.n_seeds)})':>24s} "
                           f"{row[f'{val}_mean']:14.4f} {vs:>18s}")
        out.append("  " + " ".join(r.answer))
        if r.winner:
            line = (f"  Model: {r.winner} (chosen on validation), seed {r.winner_seed}, "
                    f"run {r.winner_run_id}")
            if r.model.get("registry_uri"):
                line += (f"; registered as {r.model['registry_uri']} (load it with "
                         f"mlflow.pytorch.load_model(\"{r.model['registry_uri']}\"))")
            elif r.model.get("runs_uri"):
                line += f"; logged as {r.model['runs_uri']}"
            out.append(line)
        out.append("")
    return "\n".join(out).rstrip()

