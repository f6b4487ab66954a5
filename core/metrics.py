"""Classification metrics (scikit-learn's values), pooling across sites, and convergence speed.

Every run reports accuracy and macro precision, recall and F1 (the fields of
:class:`~fedcore.types.ClassificationMetrics`). ``evaluation.metrics`` in a spec asks for
more, computed by :func:`scores` into ``ClassificationMetrics.scores``; a metric that is
undefined on a split (AUROC where the split holds one class, the recall of a class that
does not occur) is ``None`` there, never 0.

Every metric but AUROC is a function of the confusion matrix, computed here for many
sites at once with numpy, operation for operation as scikit-learn computes it (its input
checks cost ~10 ms a split, as much as training a site; the test suite compares the
values bit for bit). AUROC is scikit-learn's ``roc_auc_score``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

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
    """The metrics ``names`` of one split, ``None`` where undefined.

    Macro averages (F1, precision, recall) leave out the classes where the metric is
    undefined (``zero_division=nan``: a class never predicted has no precision, a class
    that does not occur no recall); ``per_class_recall`` gives ``recall_class_<i>`` per
    class. AUROC is one-vs-rest macro (the positive class's for a binary task) and needs
    every class in the split and ``probabilities``; else it is undefined. Every metric but
    AUROC comes from the confusion matrix (:func:`scores_from_confusions`, scikit-learn's
    values); AUROC is scikit-learn's ``roc_auc_score``.
    """
    conf = confusion_matrices(np.asarray(y_true), np.asarray(y_pred), np.zeros(len(y_true), dtype=np.int64), 1, n_classes)
    out = scores_from_confusions(names, conf)[0]
    if "auroc" in names and len(y_true):
        out["auroc"] = auroc_score(y_true, probabilities, n_classes)
    return out


def confusion_matrices(
    y_true: np.ndarray, y_pred: np.ndarray, group: np.ndarray, n_groups: int, n_classes: int
) -> np.ndarray:
    """Confusion counts ``(n_groups, K, K)`` (rows: true class, columns: predicted) of the rows
    of each group (``group``: each row's group index), as scikit-learn's ``confusion_matrix``
    with ``labels=range(K)`` counts them, for every group at once."""
    k = n_classes
    flat = (np.asarray(group, dtype=np.int64) * k + y_true) * k + y_pred
    return np.bincount(flat, minlength=n_groups * k * k).reshape(n_groups, k, k)


def _divide(numerator: np.ndarray, denominator: np.ndarray, zero_division: float) -> np.ndarray:
    """``numerator / denominator`` in float64, ``zero_division`` where the denominator is 0
    (scikit-learn's ``_prf_divide``, operation for operation)."""
    mask = denominator == 0
    denominator = np.array(denominator, dtype=np.float64)
    denominator[mask] = 1
    result = np.asarray(numerator, dtype=np.float64) / denominator
    result[mask] = zero_division
    return result


def per_class_scores(conf: np.ndarray, zero_division: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 ``(..., K)`` of confusion matrices ``(..., K, K)``.

    The values of scikit-learn's ``precision_recall_fscore_support(labels=range(K),
    average=None, zero_division=...)`` on the rows the matrices count, bit for bit (same
    operations in the same order; ``tests/test_evaluation_metrics.py`` compares them).
    """
    conf = np.asarray(conf, dtype=np.int64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    predicted = conf.sum(axis=-2)
    true = conf.sum(axis=-1)
    precision = _divide(tp, predicted, zero_division)
    recall = _divide(tp, true, zero_division)
    # F-beta with beta = 1, as scikit-learn writes it: (1 + b^2) tp / (b^2 true + predicted).
    f1 = _divide(2.0 * tp.astype(np.float64), 1.0 * true.astype(np.float64) + predicted.astype(np.float64), zero_division)
    return precision, recall, f1


def _macro(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis leaving NaNs out (scikit-learn's ``_nanaverage``); NaN when all are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN, as scikit-learn returns
        return np.nanmean(values, axis=-1)


def scores_from_confusions(names: Sequence[str], conf: np.ndarray) -> list[dict[str, float | None]]:
    """:func:`scores` of every confusion matrix of ``conf (S, K, K)`` but AUROC (it needs
    probabilities; ``None`` here), vectorized over the S matrices: the values scikit-learn's
    metrics give on the rows each matrix counts."""
    conf = np.asarray(conf, dtype=np.int64)
    n = conf.sum(axis=(1, 2))
    k = conf.shape[-1]
    columns: dict[str, np.ndarray] = {}
    precision, recall, f1 = per_class_scores(conf, np.nan)
    for name in names:
        if name == "accuracy":
            columns[name] = _divide(np.trace(conf, axis1=1, axis2=2), n, np.nan)
        elif name == "balanced_accuracy":
            # scikit-learn: the mean recall over the classes that occur, in label order.
            occurs = conf.sum(axis=2) > 0
            columns[name] = np.array([recall[s][occurs[s]].mean() if occurs[s].any() else np.nan for s in range(len(conf))])
        elif name in ("f1", "precision", "recall"):
            columns[name] = _macro({"f1": f1, "precision": precision, "recall": recall}[name])
        elif name == "per_class_recall":
            columns.update({f"recall_class_{c}": recall[:, c] for c in range(k)})
        elif name == "auroc":
            columns[name] = np.full(len(conf), np.nan)
        else:
            raise ValueError(f"unknown metric {name!r}")
    return [
        {name: _undefined_as_none(values[s]) for name, values in columns.items()} if n[s] else dict.fromkeys(names)
        for s in range(len(conf))
    ]


def auroc_score(y_true: np.ndarray, probabilities: np.ndarray | None, n_classes: int) -> float | None:
    """One split's AUROC (scikit-learn's ``roc_auc_score``, :func:`scores`), None where undefined."""
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


def metrics_from_confusions(confs: np.ndarray, losses: Sequence[float]) -> list[ClassificationMetrics]:
    """Metrics of each confusion matrix of ``confs (S, K, K)`` (rows: true class, columns:
    predicted) with its mean loss: accuracy and scikit-learn's macro precision, recall and F1
    (``zero_division=0``), computed for all S at once (:func:`per_class_scores`).

    Pooling the sites' confusion matrices gives exactly the metrics of the pooled
    predictions, so the server never needs a single prediction.
    """
    confs = np.asarray(confs, dtype=np.int64)
    n = confs.sum(axis=(1, 2))
    precision, recall, f1 = (_macro(v) for v in per_class_scores(confs, 0.0))
    accuracy = np.trace(confs, axis1=1, axis2=2) / np.maximum(n, 1)
    nan = float("nan")
    return [
        ClassificationMetrics(n=0, loss=nan, accuracy=nan, precision=nan, recall=nan, f1=nan)
        if n[s] == 0
        else ClassificationMetrics(
            n=int(n[s]),
            loss=float(losses[s]),
            accuracy=float(accuracy[s]),
            precision=float(precision[s]),
            recall=float(recall[s]),
            f1=float(f1[s]),
        )
        for s in range(len(confs))
    ]


def metrics_from_confusion(conf: np.ndarray, loss: float) -> ClassificationMetrics:
    """:func:`metrics_from_confusions` of one confusion matrix."""
    return metrics_from_confusions(np.asarray(conf)[None], [loss])[0]


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
    pooled = scores_from_confusions(names, np.asarray(conf, dtype=np.int64)[None])[0]
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
