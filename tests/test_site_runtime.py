"""The site runtime: one object a deployed node can drive round by round, and checkpoint."""

from __future__ import annotations

import torch

from conftest import TINY_SPEC
from fedcore.engine.simulation import derive_seed, initial_module, make_sites
from fedcore.engine.site import SiteRuntime
from fedcore.engine.stages import StagePlan, site_info, stages_for
from fedcore.engine.training import weights_of
from fedcore.spec import build_components, load_experiment

DP = [
    "privacy=[{use: gaussian, settings: {level: record, epsilon: 2.0, accountant: rdp}}]",
    "aggregator.use=scaffold",
]


def _setup(overrides: list[str]):
    experiment = load_experiment(text=TINY_SPEC, overrides=overrides)
    spec = experiment.spec
    components = build_components(spec, experiment.plugins)
    data = components.dataset.load(spec.seed)
    return spec, components, data


def _site(spec, components, data, index: int) -> SiteRuntime:
    """A site built the way a deployed node builds its own, from its data and the spec's components."""
    site_data = data.sites[index]
    info = site_info(site_data, len(data.sites), data.n_features, data.n_classes, spec.training, spec.seed)
    module = components.model.build(data.n_features, data.n_classes)
    return SiteRuntime(
        site_data, module, spec.training, stages_for(components, info), data.n_classes, derive_seed(spec.seed, 1, index)
    )


def test_a_site_built_alone_releases_what_the_simulation_site_releases() -> None:
    spec, components, data = _setup(DP)
    initial = weights_of(initial_module(components, data, spec.seed))
    simulated = make_sites(spec, components, data, spec.seed)[1].fit(initial, 1)
    spec, components, data = _setup(DP)
    alone = _site(spec, components, data, 1).fit(initial, 1)
    assert alone.digest() == simulated.digest() and alone.local_steps == simulated.local_steps > 0


def test_state_dict_resumes_a_site_mid_run_exactly() -> None:
    spec, components, data = _setup(DP)
    initial = weights_of(initial_module(components, data, spec.seed))
    site = _site(spec, components, data, 0)
    first = site.fit(initial, 1)
    saved = site.state_dict()
    second = site.fit(initial + first.delta, 2)

    spec, components, data = _setup(DP)
    resumed = _site(spec, components, data, 0)
    resumed.load_state_dict(saved)
    again = resumed.fit(initial + first.delta, 2)
    assert again.digest() == second.digest()
    assert resumed.privacy_spent() == site.privacy_spent()


def test_the_plan_reads_the_contract_once() -> None:
    spec, components, data = _setup(DP)
    site = _site(spec, components, data, 0)
    plan = site.plan
    assert isinstance(plan, StagePlan) and plan.dp is not None and plan.dp.sample_rate > 0
    # SCAFFOLD corrects every gradient: a per-step seam no stacked executor runs.
    assert plan.stacked_refusal is not None and "ScaffoldSiteStage" in plan.stacked_refusal
    spec, components, data = _setup(DP[:1])
    assert _site(spec, components, data, 0).plan.stacked_refusal is None
    assert torch.equal(site.x_train, torch.tensor(data.sites[0].x_train))
