"""Classification metrics (scikit-learn), pooling across sites, and convergence speed.

Every run reports accuracy and macro precision, recall and F1 (the fields of
:class:`~fedcore.types.ClassificationMetrics`). ``evaluation.metrics`` in a spec asks for
more, computed by :func:`scores` with scikit-learn's implementations into
``ClassificationMetrics.scores``; a metric that is undefined on a split (AUROC where the
split holds one class, the recall of a class that does not occur) is ``None`` there,
never 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
)

from fedcore.types import ClassificationMetrics

#: validation accuracy must come and stay within this many points of its final value
CONVERGENCE_TOLERANCE_POINTS = 0.5
#: the metrics every run reports (fields of ClassificationMetrics)
DEFAULT_METRICS = ("accuracy", "precision", "recall", "f1")
#: equal-width bins of a class probability in a site's score histogram (the pooled AUROC's resolution)
AUROC_BINS = 1000

Histogram = list[list[list[int]]]
"""Per class ``c``: the counts of ``p(c)`` in :data:`AUROC_BINS` bins, ``[rows of other classes, rows of c]``."""


def _undefined_as_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def scores(
    names: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray, probabilities: np.ndarray | None, n_classes: int
) -> dict[str, float | None]:
    """The metrics ``names`` of one split (scikit-learn), ``None`` where undefined.

    Macro averages (F1, precision, recall) leave out the classes where the metric is
    undefined (``zero_division=nan``: a class never predicted has no precision, a class
    that does not occur no recall); ``per_class_recall`` gives ``recall_class_<i>`` per
    class. AUROC is one-vs-rest macro (the positive class's for a binary task) and needs
    every class in the split and ``probabilities``; else it is undefined.
    """
    out: dict[str, float | None] = {}
    labels = list(range(n_classes))
    n = len(y_true)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined parts are reported as None, not warned about
        for name in names:
            if n == 0:
                value: float | None = None
            elif name == "accuracy":
                value = float(accuracy_score(y_true, y_pred))
            elif name == "balanced_accuracy":
                value = float(balanced_accuracy_score(y_true, y_pred))
            elif name in ("f1", "precision", "recall"):
                fn = {"f1": f1_score, "precision": precision_score, "recall": recall_score}[name]
                value = _undefined_as_none(fn(y_true, y_pred, labels=labels, average="macro", zero_division=np.nan))
            elif name == "per_class_recall":
                per = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
                out.update({f"recall_class_{c}": _undefined_as_none(v) for c, v in zip(labels, per, strict=True)})
                continue
            elif name == "auroc":
                value = _auroc(y_true, probabilities, n_classes)
            else:
                raise ValueError(f"unknown metric {name!r}")
            out[name] = value
    return out


def _auroc(y_true: np.ndarray, probabilities: np.ndarray | None, n_classes: int) -> float | None:
    if probabilities is None or len(np.unique(y_true)) < n_classes:
        return None
    p = np.asarray(probabilities, dtype=np.float64)
    if n_classes == 2:
        return float(roc_auc_score(y_true, p[:, 1]))
    p = p / p.sum(axis=1, keepdims=True)
    return float(roc_auc_score(y_true, p, multi_class="ovr", average="macro", labels=list(range(n_classes))))


def score_histogram(y_true: np.ndarray, probabilities: np.ndarray, n_classes: int) -> Histogram:
    """Per class, the histogram of its predicted probability over rows of other classes and of it.

    What a site releases so that the server can compute the pooled AUROC
    (:func:`auroc_of_histograms`) without a single prediction.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    bins = np.minimum((p * AUROC_BINS).astype(np.int64), AUROC_BINS - 1)
    out: Histogram = []
    for c in range(n_classes):
        mine = y_true == c
        out.append(
            [
                np.bincount(bins[~mine, c], minlength=AUROC_BINS).tolist(),
                np.bincount(bins[mine, c], minlength=AUROC_BINS).tolist(),
            ]
        )
    return out


def auroc_of_histograms(histograms: Sequence[Histogram], n_classes: int) -> float | None:
    """The AUROC of pooled score histograms (scikit-learn's ``roc_auc_score``, each bin's rows
    tied at its centre), one-vs-rest macro; ``None`` where a class has no rows or no others."""
    total = np.sum(np.asarray(histograms, dtype=np.float64), axis=0)  # (classes, 2, bins)
    centres = (np.arange(AUROC_BINS) + 0.5) / AUROC_BINS
    classes = [1] if n_classes == 2 else range(n_classes)
    values = []
    for c in classes:
        others, mine = total[c]
        if mine.sum() == 0 or others.sum() == 0:
            return None
        keep_o, keep_m = others > 0, mine > 0
        y = np.concatenate([np.zeros(keep_o.sum()), np.ones(keep_m.sum())])
        s = np.concatenate([centres[keep_o], centres[keep_m]])
        w = np.concatenate([others[keep_o], mine[keep_m]])
        values.append(float(roc_auc_score(y, s, sample_weight=w)))
    return float(np.mean(values))


def metric_value(metrics: ClassificationMetrics, name: str) -> float | None:
    """One metric of a split: from ``scores`` when computed there, else the default field."""
    if name in metrics.scores:
        return metrics.scores[name]
    if name in DEFAULT_METRICS:
        return getattr(metrics, name)
    return None


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    loss: float,
    names: Sequence[str] = (),
    probabilities: np.ndarray | None = None,
) -> tuple[ClassificationMetrics, np.ndarray]:
    """Accuracy and macro precision/recall/F1 of one split, plus its confusion matrix.

    :param names: further metrics (``evaluation.metrics``) for ``scores``, from the
        predictions themselves (:func:`scores`).
    :param probabilities: the predicted class probabilities (rows x classes), for AUROC.
    """
    labels = list(range(n_classes))
    conf = confusion_matrix(y_true, y_pred, labels=labels)
    metrics = metrics_from_confusion(conf, loss)
    if names:
        metrics = metrics.model_copy(update={"scores": scores(names, y_true, y_pred, probabilities, n_classes)})
    return metrics, conf


def _labels_of(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted labels with the counts of a confusion matrix."""
    true_idx, pred_idx = np.nonzero(conf)
    counts = conf[true_idx, pred_idx]
    return np.repeat(true_idx, counts), np.repeat(pred_idx, counts)


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
    y_true, y_pred = _labels_of(conf)
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


def pool(
    confusions: Sequence[np.ndarray],
    losses: Sequence[float],
    sizes: Sequence[int],
    names: Sequence[str] = (),
    histograms: Sequence[Histogram | None] = (),
) -> ClassificationMetrics:
    """Pooled metrics over sites from their confusion matrices and mean losses.

    :param names: further metrics (``evaluation.metrics``): those of labels from the
        pooled confusion matrix (exactly the pooled predictions' values), AUROC from the
        sites' score histograms (:func:`score_histogram`; undefined without them).
    """
    total = sum(sizes)
    loss = sum(l * n for l, n in zip(losses, sizes, strict=True)) / total if total else float("nan")
    conf = np.sum(np.asarray(confusions), axis=0)
    metrics = metrics_from_confusion(conf, loss)
    if not names:
        return metrics
    k = conf.shape[0]
    y_true, y_pred = _labels_of(np.asarray(conf, dtype=np.int64))
    pooled = scores(names, y_true, y_pred, None, k)  # AUROC: None here (no probabilities)
    if "auroc" in names:
        have = [h for h in histograms if h is not None]
        pooled["auroc"] = auroc_of_histograms(have, k) if have and len(have) == len(confusions) else None
    return metrics.model_copy(update={"scores": pooled})


def convergence_epoch(
    epochs: Sequence[int], accuracies: Sequence[float | None], tolerance_points: float = CONVERGENCE_TOLERANCE_POINTS
) -> int | None:
    """The first epoch at which the validation metric (accuracy unless ``evaluation.primary``
    says otherwise) comes within ``tolerance_points`` percentage points of its final
    value and stays there until the end; an undefined value (None, NaN) breaks the run.

    Computed the same way for federated runs (epoch = round x local epochs) and the
    centralized baseline (one point per epoch).
    """
    if not accuracies:
        return None
    accuracies = [float("nan") if a is None else a for a in accuracies]
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
