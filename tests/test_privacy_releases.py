"""Every field of every message a site sends is declared in fedcore.releases.

Runs each bundled spec (shrunk: one repeat, one round, small sites, no secure
aggregation -- whose parties exchange shares of the same ClientUpdate fields) and
captures what the sites hand over: their updates, their evaluations, their
preprocessing summaries and their split sizes. A field nobody declared fails the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedcore import releases
from fedcore.engine import simulation
from fedcore.engine.site import SiteRuntime
from fedcore.spec import load_experiment
from fedcore.types import ClientUpdate, Weights

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "specs").glob("*.yaml"))
DIABETES = REPO.parent / "shared" / "data" / "diabetes-130-us-hospitals" / "diabetic_data.csv.gz"
SHRINK = [
    "repeats=1",
    "training.rounds=1",
    "training.local_epochs=1",
    "baseline.centralized=false",
    "secure_aggregation=null",
    "execution.progress=false",
    "execution.workers=1",
]


def _shrunk(path: Path) -> list[str]:
    text = path.read_text()
    overrides = list(SHRINK)
    if "synthetic-ehr" in text:
        overrides.append("data.settings.patients_per_site=150")
    if "diabetes-130" in text:
        overrides.append(f"data.settings.path={DIABETES}")
    return overrides


class Captured:
    def __init__(self) -> None:
        self.messages: list[tuple[str, Any]] = []

    def undeclared(self) -> set[str]:
        return {f"{message}.{path}" for message, value in self.messages for path in releases.undeclared(message, value)}


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Captured:
    """Wraps the seams where a site hands something over (both engines go through them)."""
    box = Captured()
    release, evaluate, init = SiteRuntime.end_round, SiteRuntime.evaluate, simulation.FederatedRun.__init__
    evaluate_sites = simulation.FederatedRun.evaluate_sites

    def capture_release(self, *args: Any, **kwargs: Any) -> ClientUpdate:
        update = release(self, *args, **kwargs)
        box.messages.append(("ClientUpdate", update))
        return update

    def capture_evaluate(self, *args: Any, **kwargs: Any) -> Any:
        evaluation = evaluate(self, *args, **kwargs)
        box.messages.append(("SiteEvaluation", evaluation))
        return evaluation

    def capture_evaluate_sites(self, *args: Any, **kwargs: Any) -> Any:
        # Federated rounds evaluate every site in one pass (evaluate_at_sites), not site by site.
        evaluations = evaluate_sites(self, *args, **kwargs)
        box.messages.extend(("SiteEvaluation", evaluation) for evaluation in evaluations)
        return evaluations

    def capture_init(self, spec: Any, job: Any, *args: Any, **kwargs: Any) -> None:
        data = job.data
        for summary in data.released_statistics.values():
            box.messages.append(("SiteSummary", summary))
        for site in data.sites:
            box.messages.append(
                ("SiteDescription", {"name": site.name, "train": site.n_train, "validation": len(site.y_val), "test": len(site.y_test)})
            )
        init(self, spec, job, *args, **kwargs)

    monkeypatch.setattr(SiteRuntime, "end_round", capture_release)
    monkeypatch.setattr(SiteRuntime, "evaluate", capture_evaluate)
    monkeypatch.setattr(simulation.FederatedRun, "evaluate_sites", capture_evaluate_sites)
    monkeypatch.setattr(simulation.FederatedRun, "__init__", capture_init)
    return box


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_field_sites_send_is_declared(path: Path, captured: Captured, tmp_path: Path) -> None:
    if "diabetes-130" in path.read_text() and not DIABETES.is_file():
        pytest.skip("the diabetes-130 data is not on this machine")
    from fedcore.engine.runner import run_experiment

    experiment = load_experiment(path, _shrunk(path))
    run_experiment(experiment, out=tmp_path / "run", workers=1, progress=False)
    kinds = {message for message, _ in captured.messages}
    assert {"ClientUpdate", "SiteEvaluation", "SiteDescription", "SiteSummary"} <= kinds
    assert captured.undeclared() == set()


def test_an_undeclared_field_breaks_the_check() -> None:
    """Adding a field to a message without declaring it must fail the capture test."""

    class LeakyUpdate(ClientUpdate):
        label_histogram: list[int] = [3, 1]

    update = LeakyUpdate(site=0, round=1, delta=Weights(arrays={}), n_samples=4)
    assert releases.undeclared("ClientUpdate", update) == ["label_histogram"]
    extra = ClientUpdate(site=0, round=1, delta=Weights(arrays={}), n_samples=4, extras={"my.new": Weights(arrays={})})
    assert releases.undeclared("ClientUpdate", extra) == ["extras.my.new"]
    assert releases.undeclared("SiteEvaluation", {"site": 0, "validation": {"auc": 0.5}}) == ["validation.auc"]


def test_the_outside_list_follows_the_protection() -> None:
    none = {f"{r.message}.{r.field}" for r in releases.outside_guarantee(frozenset({"none"}))}
    record = {f"{r.message}.{r.field}" for r in releases.outside_guarantee(frozenset({"record"}))}
    site = {f"{r.message}.{r.field}" for r in releases.outside_guarantee(frozenset({"site"}))}
    assert "ClientUpdate.delta" in none and "ClientUpdate.delta" not in record | site
    assert "ClientUpdate.n_samples" in record and "ClientUpdate.n_samples" not in site
    assert {"ClientUpdate.train_loss", "ClientUpdate.local_steps", "SiteEvaluation.test_confusion"} <= record & site
    assert "ClientUpdate.site" not in none
    fedavg = {r.field for r in releases.outside_guarantee(frozenset({"none"}), uses={"fedavg"})}
    assert "extras.scaffold.control_delta" not in fedavg and "delta" in fedavg
    assert releases.protections([{"use": "gaussian", "settings": {"level": "site"}}]) == {"site"}
    assert releases.protections([]) == {"none"}
