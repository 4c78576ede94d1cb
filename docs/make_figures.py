"""The README's figure: the latest answer of BENCHMARKS.md as a picture.

    python docs/make_figures.py          # writes docs/figures/leaderboard.png

The numbers are typed in from BENCHMARKS.md, section "The answer" (the report's rank table over
BreastMNIST, PneumoniaMNIST and RetinaMNIST; 4 Optuna trials, 3 seeds, a medical pre-training
source; commits 852b538 and 96779e8). They are not read from MLflow: that store lives on the
machine that ran the grid. When BENCHMARKS' answer changes, change RANKS and SOURCE here and
re-run this script.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SOURCE = ("3 MedMNIST datasets at 28 px (Breast, Pneumonia, Retina), ResNet-18 from a medical "
          "pre-training,\n4 tuning trials and 3 seeds per strategy. Friedman p = 0.0027; "
          "Nemenyi CD = 16.2 ranks: no pair separated.")
# strategy: (BreastMNIST, PneumoniaMNIST, RetinaMNIST) rank, BENCHMARKS "Across the three datasets"
RANKS: dict[str, tuple[int, int, int]] = {
    "layer_decay": (1, 2, 6), "full": (5, 3, 3), "scratch": (12, 1, 1), "bss": (6, 5, 4),
    "hd": (8, 9, 2), "lora": (7, 6, 7), "l2sp": (3, 10, 10), "auto_rgn": (10, 8, 5),
    "last_k": (2, 7, 15), "discriminative": (9, 4, 11), "metalr": (13, 11, 8),
    "surgical": (4, 16, 17), "sam": (14, 15, 9), "metalr_public": (11, 13, 14),
    "lp_ft": (18, 12, 13), "wise_ft": (17, 14, 12), "bitfit": (15, 17, 16),
    "linear_probe": (16, 19, 19), "delta": (19, 18, 18),
}
HIGHLIGHT = {"metalr", "metalr_public", "discriminative"}


def leaderboard(out: Path) -> None:
    rows = sorted(RANKS.items(), key=lambda kv: sum(kv[1]) / 3)[::-1]  # best at the top; ties as typed
    names = [n for n, _ in rows]
    means = [sum(r) / 3 for _, r in rows]
    fig, ax = plt.subplots(figsize=(8, 6.4), dpi=110)
    colors = ["#d95f02" if n in HIGHLIGHT else "#1b9e77" if n == "full" else "#7570b3"
              for n in names]
    ax.barh(names, means, color=colors)
    for y, (_, r) in enumerate(rows):
        ax.plot(r, [y] * 3, "k.", ms=4, alpha=0.6)
    ax.set_xlabel("mean rank over the 3 datasets (1 = best; dots: each dataset's rank)")
    ax.set_xlim(0, 20)
    ax.set_title("Which fine-tuning strategy? Mean rank of 19 strategies", fontsize=11)
    fig.text(0.01, 0.01, SOURCE, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    leaderboard(Path(__file__).parent / "figures" / "leaderboard.png")
