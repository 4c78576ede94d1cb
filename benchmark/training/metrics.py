"""Task-aware metrics: AUC and accuracy as MedMNIST defines them, balanced accuracy, macro-F1.

MedMNIST's evaluator (``medmnist/evaluator.py``):

* binary: AUC of the positive-class score; ACC at threshold 0.5 on that score;
* multi-class / ordinal: mean one-vs-rest AUC over classes; ACC of the arg-max;
* multi-label: mean AUC over labels; ACC = mean over labels of the 0.5-threshold accuracy.

Balanced accuracy and macro-F1 follow scikit-learn (for multi-label: mean per label / macro F1
over the label columns). Scores are probabilities (softmax for single-label, sigmoid otherwise).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from metalr_bench.datasets.core.base import TaskType
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

METRICS = ("auc", "acc", "balanced_acc", "f1")


def scores_from_logits(task: TaskType, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits) if task is TaskType.MULTILABEL else F.softmax(logits, dim=1)


def loss_fn_for(task: TaskType):
    """Cross-entropy for single-label tasks, BCE-with-logits for multi-label."""
    if task is TaskType.MULTILABEL:
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits.float(), y.float())
    return lambda logits, y: F.cross_entropy(logits.float(), y)


def _safe_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC, NaN when only one class is present (undefined, not 0.5)."""
    return float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan")


def compute_metrics(task: TaskType, y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Metrics of ``scores`` (N, C) against labels ``y_true`` ((N,) or (N, L) for multi-label)."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if task is TaskType.MULTILABEL:
        pred = (scores > 0.5).astype(int)
        y = y_true.astype(int)
        aucs = [_safe_auc(y[:, j], scores[:, j]) for j in range(y.shape[1])]
        return {
            "auc": float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan"),
            "acc": float(np.mean([(pred[:, j] == y[:, j]).mean() for j in range(y.shape[1])])),
            "balanced_acc": float(np.mean(
                [balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(y.shape[1])]
            )),
            "f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        }
    y = y_true.astype(int).reshape(-1)
    n_classes = scores.shape[1]
    if task is TaskType.BINARY:
        auc = _safe_auc(y, scores[:, 1])
        pred = (scores[:, 1] > 0.5).astype(int)
    else:
        aucs = [_safe_auc((y == c).astype(int), scores[:, c]) for c in range(n_classes)]
        auc = float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")
        pred = scores.argmax(1)
    return {
        "auc": auc,
        "acc": float((pred == y).mean()),
        "balanced_acc": float(balanced_accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, average="macro", labels=list(range(n_classes)),
                             zero_division=0)),
    }
