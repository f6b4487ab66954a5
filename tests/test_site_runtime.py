"""The site runtime: one object a deployed node can drive round by round, and checkpoint."""

from __future__ import annotations

import torch

from conftest import TINY_SPEC
from fedcore.engine.simulation import derive_seed, initial_module, make_sites, site_stages
from fedcore.engine.site import SiteRuntime
from fedcore.engine.stages import StagePlan
from fedcore.engine.training import weights_of
from fedcore.spec import build_components, load_experiment

DP = [
    "privacy=[{use: gaussian, settings: {level: record, epsilon: 2.0, accountant: rdp}}]",
    "aggregator.use=scaffold",
    "execution.reproducible_noise=true",  # DP noise from the seed, so two builds of a site agree
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
    module = components.model.build(data.n_features, data.n_classes)
    stages = site_stages(spec, components, data, site_data, spec.seed)
    return SiteRuntime(site_data, module, spec.training, stages, data.n_classes, derive_seed(spec.seed, 1, index))


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


def test_by_default_two_builds_of_a_site_draw_different_dp_noise() -> None:
    overrides = [o for o in DP if "reproducible_noise" not in o]
    spec, components, data = _setup(overrides)
    initial = weights_of(initial_module(components, data, spec.seed))
    first = _site(spec, components, data, 0).fit(initial, 1)
    second = _site(spec, components, data, 0).fit(initial, 1)
    assert first.local_steps == second.local_steps and first.digest() != second.digest()


def test_a_rebuilt_site_reuses_the_class_counts_it_released_and_never_draws_new_ones() -> None:
    """Under class_weighted_loss the noisy class counts are released (and accounted) once; a site
    rebuilt from its state (resume, a deployed node's next message) must train with the same ones."""
    weighted = [
        "privacy=[{use: gaussian, settings: {level: record, epsilon: 2.0, accountant: rdp, class_weighted_loss: true}}]"
    ]
    spec, components, data = _setup(weighted)
    site = _site(spec, components, data, 0)
    rebuilt = _site(spec, components, data, 0)
    assert site.plan.class_weight is not None
    assert not (site.plan.class_weight == rebuilt.plan.class_weight).all()  # fresh noise by default
    rebuilt.load_state_dict(site.state_dict())
    assert (site.plan.class_weight == rebuilt.plan.class_weight).all()
    assert (rebuilt.trainer._class_weight.numpy() == site.plan.class_weight).all()
