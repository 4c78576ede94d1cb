"""Published numbers beside ours: the config's ``references:`` rows, read back from MLflow.

Why from MLflow (the parent run's ``references.json``, logged by the runner) and not from the
config module: the report is rebuilt from the store alone and never imports the benchmark's
config. Why never ranked or tested with our runs: a published row is one number from another
protocol (other training images, other starting weights, another checkpoint rule, often
another number of seeds), with no per-seed values to pair; the leaderboard shows it as a row
marked *published*, and a note says how its protocol differs from ours.
"""

from __future__ import annotations

import html
import json
import math
import tempfile
from typing import Any

import pandas as pd
from metalr_bench.benchmark.tracking import tags as T
from metalr_bench.reports.results import BenchmarkRuns, _client
from metalr_bench.reports.tables import METRIC_NAMES, _cell_html
from mlflow import MlflowClient

COLUMNS = ["dataset", "size", "model", "arch", "citation", "train_images", "weights",
           "selection", "notes", "metrics"]


def load_references(tracking_uri: str | MlflowClient, runs: BenchmarkRuns) -> pd.DataFrame:
    """The reference rows the parent run(s) logged (``references.json``); empty when none."""
    client = _client(tracking_uri)
    rows: list[dict[str, Any]] = []
    for parent in runs.parents:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(parent.info.run_id, T.REFERENCES_ARTIFACT, tmp)
                with open(path) as fh:
                    rows += json.load(fh)["references"]
        except Exception:  # noqa: BLE001 - a run without references (or an older one)
            continue
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.drop_duplicates(subset=["dataset", "size", "model", "citation"],
                                 ignore_index=True) if len(table) else table


def _names(g: pd.DataFrame) -> set[str]:
    """The names a dataset goes by in the runs: its tag, its adapter, its cross-validation group."""
    out: set[str] = set()
    for col in ("dataset", "param.dataset.adapter", "cv_group"):
        if col in g:
            out |= {str(v) for v in g[col].dropna()}
    return out


def matching(refs: pd.DataFrame, results: pd.DataFrame, by: str = "dataset_key") -> pd.DataFrame:
    """``refs`` with the ``dataset_key`` (or ``by``) of the benchmark dataset each one matches:
    the same dataset name and image size. Rows matching no dataset of the grid are dropped.

    ``ours``: the networks our runs of that dataset used (``model`` tag), so a row that names its
    network (``arch``) says whether ours beside it is the same one: MedMNIST's "ResNet-18 (28)"
    is its 28-px ResNet (``resnet18_cifar``), not torchvision's ``resnet18``."""
    out = []
    if refs.empty or results.empty:
        return refs.assign(key=pd.Series(dtype=object)).iloc[0:0]
    for key, g in results.groupby(by, sort=True):
        names, sizes = _names(g), set(g["image_size"].dropna().astype(int))
        hit = refs[refs["dataset"].isin(names) & refs["size"].astype(int).isin(sizes)]
        ours = sorted({str(v) for v in g["model"].dropna()}) if "model" in g else []
        out.append(hit.assign(key=key, ours=", ".join(ours)))
    return pd.concat(out, ignore_index=True) if out else refs.iloc[0:0]


def leaderboard_with_published_html(board: pd.DataFrame, refs: pd.DataFrame,
                                    metrics: list[str], primary: str,
                                    table_id: str = "leaderboard-published") -> str:
    """Per dataset: our strategies (mean ± std [CI], rank) and then the published rows of the
    same dataset and size, marked *published*, with no rank."""
    rows = []
    for ds, b in board.groupby("dataset", sort=True):
        for _, r in b.sort_values("rank").iterrows():
            row = {"dataset": html.escape(str(ds)), "strategy": html.escape(str(r["strategy"])),
                   "source": "this benchmark", "seeds": int(r["n_seeds"])}
            for m in metrics:
                row[METRIC_NAMES.get(m, m)] = _cell_html(r[f"{m}_mean"], r[f"{m}_std"],
                                                         r[f"{m}_ci_low"], r[f"{m}_ci_high"],
                                                         False)
            row[f"rank ({METRIC_NAMES.get(primary, primary)})"] = f"{r['rank']:g}"
            rows.append(row)
        for _, ref in refs[refs["key"] == ds].iterrows():
            row = {"dataset": html.escape(str(ds)),
                   "strategy": f"{html.escape(str(ref['model']))} <em>published</em>"
                   + _network_note(ref),
                   "source": html.escape(str(ref["citation"])), "seeds": "–"}
            for m in metrics:
                v = ref["metrics"].get(m.removeprefix("test_"), math.nan)
                row[METRIC_NAMES.get(m, m)] = "–" if math.isnan(v) else f"{v:.3f}"
            row[f"rank ({METRIC_NAMES.get(primary, primary)})"] = "published"
            rows.append(row)
    return pd.DataFrame(rows).to_html(index=False, escape=False, table_id=table_id,
                                      classes="metalr-table", border=0)


def _network_note(ref: pd.Series) -> str:
    """`` (same network: resnet18_cifar)`` or `` (another network: this row's resnet18_cifar,
    ours resnet18)`` when the row names its network; nothing otherwise."""
    arch, ours = ref.get("arch"), ref.get("ours")
    if not isinstance(arch, str) or not arch or not isinstance(ours, str) or not ours:
        return ""
    if arch in ours.split(", "):
        return f" (same network: <code>{html.escape(arch)}</code>)"
    return (f" (another network: this row's <code>{html.escape(arch)}</code>, ours "
            f"<code>{html.escape(ours)}</code>)")


def protocol_note(refs: pd.DataFrame, results: pd.DataFrame) -> list[str]:
    """One line per published protocol: how it differs from ours (training images, starting
    weights, selection rule)."""
    ours_images = sorted({str(v) for v in results.get("param.n_train_images",
                                                       pd.Series(dtype=object)).dropna()})
    ours_weights = sorted({str(v) for v in results.get("param.weights",
                                                        pd.Series(dtype=object)).dropna()})
    ours_sel = sorted({str(v) for v in results.get("param.selection_metric",
                                                    pd.Series(dtype=object)).dropna()})
    lines = [f"**Ours**: {'/'.join(ours_images) or 'the logged'} training images, starting "
             f"weights `{'/'.join(ours_weights) or '?'}`, the checkpoint of the best validation "
             f"{'/'.join(ours_sel) or 'metric'}; every strategy over several seeds."]
    seen = set()
    for _, r in refs.iterrows():
        key = (r["citation"], r["model"], r["train_images"], r["weights"], r["selection"],
               r["notes"])
        if key in seen:
            continue
        seen.add(key)
        bits = [f"{r['train_images']} training images" if r["train_images"] else None,
                f"starting weights: {r['weights']}" if r["weights"] else None,
                f"selection: {r['selection']}" if r["selection"] else None,
                r["notes"] or None]
        lines.append(f"**{r['model']}, {r['citation']}**: "
                     + "; ".join(b for b in bits if b) + ".")
    return lines
