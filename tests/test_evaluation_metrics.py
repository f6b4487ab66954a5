"""``evaluation.metrics`` and ``evaluation.primary``: scikit-learn's metrics per site and
pooled, undefined reported as undefined (never 0, never a crash), convergence and the
headline tables on the primary metric, and the default output untouched without them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from fedcore.engine.runner import run_experiment
from fedcore.errors import SpecError
from fedcore.metrics import auroc_of_histograms, convergence_epoch, pool, score_histogram, scores
from fedcore.spec import load_experiment

ALL = ["accuracy", "balanced_accuracy", "auroc", "f1", "precision", "recall", "per_class_recall"]


def _split(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p.argmax(axis=1), p


def test_scores_are_scikit_learns() -> None:
    y, pred, p = _split(300, 3, 0)
    got = scores(ALL, y, pred, p, 3)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert got["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert got["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    for c, value in enumerate(recall_score(y, pred, average=None)):
        assert got[f"recall_class_{c}"] == pytest.approx(value)
    yb, predb, pb = _split(200, 2, 1)
    assert scores(["auroc"], yb, predb, pb, 2)["auroc"] == pytest.approx(roc_auc_score(yb, pb[:, 1]))


def test_undefined_is_none_never_zero() -> None:
    y = np.zeros(10, dtype=np.int64)  # a split with one class
    pred = np.array([0] * 8 + [1] * 2)
    p = np.full((10, 2), 0.5)
    got = scores(ALL, y, pred, p, 2)
    assert got["auroc"] is None
    assert got["recall_class_1"] is None and got["recall_class_0"] == pytest.approx(0.8)
    assert got["recall"] == pytest.approx(0.8)  # macro over the classes where it is defined
    empty = scores(ALL, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, 2)), 2)
    assert all(v is None for v in empty.values())


def test_pooled_metrics_equal_the_pooled_predictions() -> None:
    sites = [_split(n, 3, s) for s, n in enumerate((120, 40, 300))]
    confusions, losses, sizes, hists = [], [], [], []
    from sklearn.metrics import confusion_matrix

    for y, pred, p in sites:
        confusions.append(confusion_matrix(y, pred, labels=[0, 1, 2]))
        losses.append(1.0)
        sizes.append(len(y))
        hists.append(score_histogram(y, p, 3))
    pooled = pool(confusions, losses, sizes, ALL, hists)
    y = np.concatenate([s[0] for s in sites])
    pred = np.concatenate([s[1] for s in sites])
    p = np.concatenate([s[2] for s in sites])
    exact = scores(ALL, y, pred, p, 3)
    for name, value in exact.items():
        if name == "auroc":  # from 1000-bin histograms: ties within a bin
            assert pooled.scores[name] == pytest.approx(value, abs=2e-3)
        else:
            assert pooled.scores[name] == pytest.approx(value)
    # a site without its histogram: the pooled AUROC is undefined, not a partial value
    assert pool(confusions, losses, sizes, ["auroc"], [hists[0], None, hists[2]]).scores["auroc"] is None
    assert auroc_of_histograms([score_histogram(np.zeros(5, dtype=np.int64), np.full((5, 3), 1 / 3), 3)], 3) is None


def test_convergence_breaks_on_undefined() -> None:
    assert convergence_epoch([1, 2, 3], [0.5, 0.9, 0.9]) == 2
    assert convergence_epoch([1, 2, 3], [0.9, None, 0.9]) == 3
    assert convergence_epoch([1, 2], [0.9, None]) is None


TINY = """
name: metrics
seed: 3
repeats: 2
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 80, n_classes: 3}}
model: {use: mlp, settings: {hidden: [8]}}
training: {rounds: 3, local_epochs: 1, batch_size: 16}
baseline: {centralized: true}
execution: {workers: 1, progress: false, checkpoints: false}
"""
EVALUATION = "evaluation: {metrics: [auroc, accuracy, balanced_accuracy, f1, per_class_recall], primary: auroc}\n"


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        ("{metrics: [accuracy], primary: auroc}", "primary 'auroc' is not among evaluation.metrics"),
        ("{metrics: [auroc], primary: per_class_recall}", "primary must be one number"),
        ("{metrics: [roc]}", "evaluation.metrics.0"),
    ],
)
def test_bad_evaluation_is_one_line(evaluation: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_experiment(text=TINY + f"evaluation: {evaluation}\n")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_evaluation_cannot_be_swept() -> None:
    with pytest.raises(SpecError, match="cannot sweep 'evaluation.primary'"):
        load_experiment(text=TINY + EVALUATION + "sweep: {evaluation.primary: [auroc, accuracy]}\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("metrics")
    return {
        engine: run_experiment(
            load_experiment(text=TINY + EVALUATION, overrides=[f"execution.engine={engine}"]), out=out / engine, workers=1, progress=False
        )
        for engine in ("sequential", "vectorized")
    }


def test_per_site_and_pooled_scores_on_both_engines(runs: dict[str, Path]) -> None:
    records = {e: [json.loads(line) for line in (d / "rounds.jsonl").read_text().splitlines()] for e, d in runs.items()}
    for record in records["sequential"]:
        assert set(record["test"]["scores"]) == {"auroc", "accuracy", "balanced_accuracy", "f1", "recall_class_0", "recall_class_1", "recall_class_2"}
        assert record["test"]["scores"]["accuracy"] == pytest.approx(record["test"]["accuracy"])
        for site in record["per_site"]:
            assert "test_histogram" not in site  # histograms serve pooling, rounds.jsonl keeps metrics only
            assert set(site["test"]["scores"]) >= {"auroc", "balanced_accuracy"}
    # a site whose test split lacks a class: AUROC undefined there (null), the pooled one defined
    undefined = [s for r in records["sequential"] for s in r["per_site"] if s["test"]["scores"]["auroc"] is None]
    assert undefined and all(r["test"]["scores"]["auroc"] is not None for r in records["sequential"])
    by_key = {
        e: {(r["mode"], r["arm"], r["repeat"], r["round"]): r["test"]["scores"] for r in rs} for e, rs in records.items()
    }
    assert by_key["sequential"].keys() == by_key["vectorized"].keys()
    for key, want in by_key["sequential"].items():
        got = by_key["vectorized"][key]
        assert got.keys() == want.keys()
        for name in want:
            assert (got[name] is None) == (want[name] is None)
            if want[name] is not None:
                assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6)


def test_primary_drives_convergence_and_tables(runs: dict[str, Path]) -> None:
    run_dir = runs["sequential"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["primary"] == "auroc"
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    for repeat, run in enumerate(summary["arms"][0]["federated"]["runs"]):
        mine = sorted((r for r in records if r["mode"] == "federated" and r["repeat"] == repeat), key=lambda r: r["round"])
        want = convergence_epoch([r["epoch"] for r in mine], [r["validation"]["scores"]["auroc"] for r in mine])
        assert run["convergence_epoch"] == want
    aggregate = summary["arms"][0]["federated"]["aggregate"]
    assert not math.isnan(aggregate["scores.auroc"]["mean"])
    report = (run_dir / "report.md").read_text()
    assert "| AUROC — primary |" in report
    assert "undefined" in report  # the site whose test split lacks a class
    assert "validation AUROC (the primary metric)" in report
    assert (run_dir / "figures" / "auroc.png").is_file()
    assert "`SiteEvaluation` `validation.scores.*`, `test.scores.*`" not in report  # no DP: no releases list


def test_default_output_has_no_scores(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run_dir = run_experiment(
        load_experiment(text=TINY, overrides=["repeats=1", "training.rounds=1"]), out=tmp_path / "run", workers=1, progress=False
    )
    assert '"scores"' not in (run_dir / "rounds.jsonl").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "primary" not in summary and "metrics" not in summary
    assert "evaluation" not in yaml.safe_load((run_dir / "spec.resolved.yaml").read_text())
    report = (run_dir / "report.md").read_text()
    assert "| Accuracy (%) |" in report and "| Metric | Centralized | Federated | Deviation (points) |" in report
    assert "Centralized model per site" not in report and "baseline:" not in report


def test_scores_and_histograms_are_declared_releases() -> None:
    from fedcore import releases
    from fedcore.engine.site import evaluate_split_pair
    from fedcore.components import SiteData

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4)).astype(np.float32)
    y = rng.integers(0, 3, 12)
    site = SiteData(site=0, name="a", x_train=x, y_train=y, x_val=x, y_val=y, x_test=x, y_test=y)
    evaluation = evaluate_split_pair(torch.nn.Linear(4, 3), site, 3, ALL)
    assert evaluation.test_histogram is not None and evaluation.test.scores
    assert releases.undeclared("SiteEvaluation", evaluation) == []
    listed = "\n".join(releases.outside_text(frozenset({"record"}), {"gaussian", releases.EVALUATION}))
    assert "test.scores.*" in listed and "test_histogram" in listed
    assert "test.scores.*" not in "\n".join(releases.outside_text(frozenset({"record"}), {"gaussian"}))


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn on splits where classes are absent
def test_confusion_metrics_are_scikit_learns_bit_for_bit() -> None:
    """The vectorized metrics of many confusion matrices at once equal scikit-learn's functions
    on the rows each matrix counts, exactly (not approximately): empty classes, never-predicted
    classes, single-row and empty splits, 2 to 12 classes."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        precision_score,
    )

    from fedcore.metrics import confusion_matrices, metrics_from_confusions, scores_from_confusions

    rng = np.random.default_rng(3)
    names = ["accuracy", "balanced_accuracy", "f1", "precision", "recall", "per_class_recall"]
    for k in (2, 3, 5, 9, 12):
        splits = []
        for s in range(40):
            n = int(rng.choice([0, 1, 2, 7, 40, 300]))
            present = rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False)  # some classes absent
            y = rng.choice(present, n)
            pred = np.where(rng.random(n) < 0.6, y, rng.choice(rng.choice(k, size=2), n))
            splits.append((y.astype(np.int64), pred.astype(np.int64)))
        group = np.concatenate([np.full(len(y), s) for s, (y, _) in enumerate(splits)]).astype(np.int64)
        confs = confusion_matrices(
            np.concatenate([y for y, _ in splits]), np.concatenate([p for _, p in splits]), group, len(splits), k
        )
        losses = rng.random(len(splits)).tolist()
        got = metrics_from_confusions(confs, losses)
        extra = scores_from_confusions(names, confs)
        for s, (y, pred) in enumerate(splits):
            labels = list(range(k))
            if len(y) == 0:
                assert got[s].n == 0 and math.isnan(got[s].f1) and all(v is None for v in extra[s].values())
                continue
            assert (confs[s] == confusion_matrix(y, pred, labels=labels)).all()
            p, r, f, _ = precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
            assert (got[s].precision, got[s].recall, got[s].f1) == (p, r, f)
            assert got[s].accuracy == accuracy_score(y, pred) and got[s].loss == losses[s] and got[s].n == len(y)
            assert extra[s] == scores(names, y, pred, None, k)  # one split through the same code
            nan_p = precision_score(y, pred, labels=labels, average="macro", zero_division=np.nan)
            assert extra[s]["precision"] == (None if math.isnan(nan_p) else nan_p)
            assert extra[s]["balanced_accuracy"] == balanced_accuracy_score(y, pred)
            assert extra[s]["f1"] == _none_nan(f1_score(y, pred, labels=labels, average="macro", zero_division=np.nan))
            per = recall_score(y, pred, labels=labels, average=None, zero_division=np.nan)
            assert [extra[s][f"recall_class_{c}"] for c in labels] == [_none_nan(v) for v in per]


def _none_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sites_evaluated_in_one_pass_get_their_own_numbers() -> None:
    """``evaluate_at_sites`` (all sites' rows in one forward pass) gives each site what it
    gets evaluated alone (the loss to float rounding), and what scikit-learn and a plain
    loss give on its rows."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from fedcore.engine.site import evaluate_at_sites, evaluate_split_pair
    from fedcore.testing import tiny_federated_data

    data = tiny_federated_data(sites=7, rows=50, features=6, classes=3, seed=2)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    together = evaluate_at_sites(module, data.sites, 3, ALL)
    for got, alone in zip(together, [evaluate_split_pair(module, site, 3, ALL) for site in data.sites], strict=True):
        # The loss to float rounding (a matmul over more rows may round a logit differently).
        for split in ("validation", "test"):
            a, b = getattr(got, split), getattr(alone, split)
            assert a.model_copy(update={"loss": 0.0}) == b.model_copy(update={"loss": 0.0})
            assert a.loss == pytest.approx(b.loss, rel=1e-6)
        assert got.model_copy(update={"validation": None, "test": None}) == alone.model_copy(update={"validation": None, "test": None})
    for site, got in zip(data.sites, together, strict=True):
        with torch.no_grad():
            logits = module(torch.from_numpy(site.x_test))
        pred = logits.argmax(dim=1).numpy()
        assert got.test_confusion == confusion_matrix(site.y_test, pred, labels=[0, 1, 2]).tolist()
        p, r, f, _ = precision_recall_fscore_support(site.y_test, pred, labels=[0, 1, 2], average="macro", zero_division=0)
        assert (got.test.precision, got.test.recall, got.test.f1) == (p, r, f)
        plain = float(F.cross_entropy(logits, torch.from_numpy(site.y_test)))
        assert got.test.loss == pytest.approx(plain, rel=1e-6)
