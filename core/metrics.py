"""Classification metrics (scikit-learn), pooling across sites, and convergence speed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from fedcore.types import ClassificationMetrics

#: validation accuracy must come and stay within this many points of its final value
CONVERGENCE_TOLERANCE_POINTS = 0.5


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, loss: float
) -> tuple[ClassificationMetrics, np.ndarray]:
    """Accuracy and macro precision/recall/F1 of one split, plus its confusion matrix."""
    labels = list(range(n_classes))
    conf = confusion_matrix(y_true, y_pred, labels=labels)
    return metrics_from_confusion(conf, loss), conf


def metrics_from_confusion(conf: np.ndarray, loss: float) -> ClassificationMetrics:
    """Metrics from a confusion matrix (rows: true class, columns: predicted class).

    Pooling the sites' confusion matrices gives exactly the metrics of the pooled
    predictions, so the server never needs a single prediction.
    """
    conf = np.asarray(conf, dtype=np.int64)
    n = int(conf.sum())
    if n == 0:
        nan = float("nan")
        return ClassificationMetrics(n=0, loss=nan, accuracy=nan, precision=nan, recall=nan, f1=nan)
    k = conf.shape[0]
    true_idx, pred_idx = np.nonzero(conf)
    counts = conf[true_idx, pred_idx]
    y_true = np.repeat(true_idx, counts)
    y_pred = np.repeat(pred_idx, counts)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(k)), average="macro", zero_division=0
    )
    return ClassificationMetrics(
        n=n,
        loss=float(loss),
        accuracy=float(np.trace(conf) / n),
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
    )


def pool(confusions: Sequence[np.ndarray], losses: Sequence[float], sizes: Sequence[int]) -> ClassificationMetrics:
    """Pooled metrics over sites from their confusion matrices and mean losses."""
    total = sum(sizes)
    loss = sum(l * n for l, n in zip(losses, sizes, strict=True)) / total if total else float("nan")
    return metrics_from_confusion(np.sum(np.asarray(confusions), axis=0), loss)


def convergence_epoch(epochs: Sequence[int], accuracies: Sequence[float], tolerance_points: float = CONVERGENCE_TOLERANCE_POINTS) -> int | None:
    """The first epoch at which validation accuracy comes within ``tolerance_points``
    percentage points of its final value and stays there until the end.

    Computed the same way for federated runs (epoch = round x local epochs) and the
    centralized baseline (one point per epoch).
    """
    if not accuracies:
        return None
    final = accuracies[-1]
    tol = tolerance_points / 100.0
    first: int | None = None
    for epoch, acc in zip(epochs, accuracies, strict=True):
        if math.isnan(acc):
            first = None
            continue
        if abs(acc - final) <= tol + 1e-12:
            if first is None:
                first = epoch
        else:
            first = None
    return first


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
