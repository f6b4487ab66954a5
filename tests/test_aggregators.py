"""Aggregators against their formulas, on hand-made updates and sums."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcore.components import RoundContext, SiteInfo, plain_sum
from fedcore.engine.training import LocalTrainer, weights_of
from fedcore.errors import SpecError
from fedcore.plugins.aggregators import fedcore_aggregators
from fedcore.plugins.aggregators.adaptive import FedAdagrad, FedAdam, FedYogi
from fedcore.plugins.aggregators.fedavg import FedAvg
from fedcore.plugins.aggregators.fedavgm import FedAvgM
from fedcore.plugins.aggregators.fedprox import FedProx, ProximalStage
from fedcore.plugins.aggregators.robust import Krum, Median, MultiKrum, TrimmedMean, krum_scores
from fedcore.plugins.aggregators.scaffold import CONTROL, CONTROL_DELTA, Scaffold, ScaffoldSiteStage
from fedcore.registry import PluginManager
from fedcore.spec import ExperimentSpec, PluginRef, TrainingSpec, check_capabilities
from fedcore.testing import check_component
from fedcore.types import ClientUpdate, SecureSum, Weights


def weights(**arrays: object) -> Weights:
    return Weights(arrays={k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})


def update(site: int, n: int, **arrays: object) -> ClientUpdate:
    return ClientUpdate(site=site, round=1, delta=weights(**arrays), n_samples=n)


GLOBAL = weights(w=[1.0, -2.0], b=[0.5])


def summed(*updates: ClientUpdate) -> SecureSum:
    return plain_sum(1, updates)


# ------------------------------------------------------------------ contract


@pytest.mark.parametrize("cls", fedcore_aggregators(), ids=lambda c: c.name)
def test_every_aggregator_follows_the_component_contract(cls: type) -> None:
    check_component(cls)
    assert cls.Settings.model_config.get("frozen") is True


def test_robust_aggregators_and_only_they_need_individual_updates() -> None:
    flags = {cls.name: cls.needs_individual_updates for cls in fedcore_aggregators()}
    assert {name for name, needs in flags.items() if needs} == {"median", "trimmed-mean", "krum", "multi-krum"}


def test_secure_aggregation_refuses_robust_aggregator_naming_both_plugins() -> None:
    spec = ExperimentSpec(
        name="x",
        data=PluginRef(use="synthetic-ehr", settings={"sites": 5}),
        aggregator=PluginRef(use="krum"),
        secure_aggregation=PluginRef(use="masking"),
    )
    with pytest.raises(SpecError, match=r"krum.*masking"):
        check_capabilities(spec, PluginManager())


# ------------------------------------------------------------------ sum-only rules


def test_fedavg_is_the_exact_sample_weighted_mean() -> None:
    a = update(0, 1, w=[1.0, 1.0], b=[0.0])
    b = update(1, 3, w=[5.0, -3.0], b=[4.0])
    new = FedAvg().aggregate_sum(1, GLOBAL, summed(a, b))
    # (1*1 + 3*5)/4 = 4, (1*1 + 3*-3)/4 = -2, (0 + 12)/4 = 3
    np.testing.assert_array_equal(new["w"], np.float32([1.0 + 4.0, -2.0 - 2.0]))
    np.testing.assert_array_equal(new["b"], np.float32([0.5 + 3.0]))
    assert new["w"].dtype == np.float32


def test_fedavg_default_aggregate_equals_aggregate_sum() -> None:
    a, b = update(0, 2, w=[1.0, 2.0], b=[1.0]), update(1, 6, w=[0.0, -2.0], b=[3.0])
    fedavg = FedAvg()
    assert fedavg.aggregate(1, GLOBAL, [a, b]).allclose(fedavg.aggregate_sum(1, GLOBAL, summed(a, b)), rtol=0, atol=0)


def test_fedprox_server_side_is_fedavg() -> None:
    a, b = update(0, 2, w=[1.0, 2.0], b=[1.0]), update(1, 6, w=[0.0, -2.0], b=[3.0])
    prox = FedProx(FedProx.Settings(mu=0.5))
    assert prox.aggregate_sum(1, GLOBAL, summed(a, b)).allclose(FedAvg().aggregate_sum(1, GLOBAL, summed(a, b)), rtol=0, atol=0)


def test_fedavgm_two_rounds_by_hand() -> None:
    agg = FedAvgM(FedAvgM.Settings(server_learning_rate=0.5, momentum=0.9))
    r1 = agg.aggregate_sum(1, GLOBAL, summed(update(0, 1, w=[2.0, 0.0], b=[1.0])))
    # v1 = d1 = (2, 0, 1); x1 = x0 + 0.5 v1
    np.testing.assert_allclose(r1["w"], [2.0, -2.0])
    np.testing.assert_allclose(r1["b"], [1.0])
    r2 = agg.aggregate_sum(2, r1, summed(update(0, 1, w=[0.0, 4.0], b=[-1.0])))
    # v2 = 0.9 v1 + d2 = (1.8, 4, -0.1); x2 = x1 + 0.5 v2
    np.testing.assert_allclose(r2["w"], [2.9, 0.0], rtol=1e-6)
    np.testing.assert_allclose(r2["b"], [0.95], rtol=1e-6)


def test_fedadam_one_step_by_hand() -> None:
    eta, tau, beta1, beta2 = 0.1, 0.01, 0.9, 0.99
    agg = FedAdam(FedAdam.Settings(server_learning_rate=eta, tau=tau, beta1=beta1, beta2=beta2))
    # mean delta of (n=1: 0.2) and (n=3: -0.6) is (0.2 - 1.8)/4 = -0.4 on the one coordinate
    new = agg.aggregate_sum(1, weights(w=[1.0]), summed(update(0, 1, w=[0.2]), update(1, 3, w=[-0.6])))
    m = (1 - beta1) * -0.4  # -0.04
    v = beta2 * tau**2 + (1 - beta2) * 0.16  # 0.000099 + 0.0016 = 0.001699
    expected = 1.0 + eta * m / (math.sqrt(v) + tau)  # 1 - 0.004 / 0.05122 = 0.92190
    assert new["w"][0] == pytest.approx(expected, rel=1e-6)
    assert new["w"][0] == pytest.approx(0.92190, abs=1e-4)


def test_fedyogi_and_fedadagrad_one_step_by_hand() -> None:
    tau = 0.01
    d = summed(update(0, 1, w=[0.5]))
    yogi = FedYogi(FedYogi.Settings(server_learning_rate=1.0, tau=tau, beta1=0.0, beta2=0.9))
    v_yogi = tau**2 - 0.1 * 0.25 * np.sign(tau**2 - 0.25)  # sign is -1: v grows by 0.025
    assert yogi.aggregate_sum(1, weights(w=[0.0]), d)["w"][0] == pytest.approx(0.5 / (math.sqrt(v_yogi) + tau), rel=1e-6)
    adagrad = FedAdagrad(FedAdagrad.Settings(server_learning_rate=1.0, tau=tau, beta1=0.0))
    v_ada = tau**2 + 0.25
    assert adagrad.aggregate_sum(1, weights(w=[0.0]), d)["w"][0] == pytest.approx(0.5 / (math.sqrt(v_ada) + tau), rel=1e-6)


def test_adagrad_takes_no_beta2() -> None:
    with pytest.raises(ValueError, match="beta2"):
        FedAdagrad.Settings(beta2=0.9)


def test_integer_buffers_take_the_plain_mean_step() -> None:
    glob = Weights(arrays={"w": np.float32([0.0]), "count": np.int64([10])})
    up = ClientUpdate(site=0, round=1, delta=Weights(arrays={"w": np.float32([1.0]), "count": np.int64([3])}), n_samples=2)
    for agg in (FedAdam(), FedAvgM(), FedYogi()):
        new = agg.aggregate_sum(1, glob, summed(up))
        assert new["count"].dtype == np.int64 and new["count"][0] == 13


@pytest.mark.parametrize("cls", [FedAvgM, FedAdam, FedYogi, FedAdagrad])
def test_server_state_round_trips_through_a_checkpoint(cls: type, tmp_path: Path) -> None:
    first, second = summed(update(0, 2, w=[0.3, -0.1], b=[0.2])), summed(update(0, 2, w=[-0.2, 0.4], b=[0.1]))
    original = cls()
    after_one = original.aggregate_sum(1, GLOBAL, first)
    torch.save(original.state_dict(), tmp_path / "agg.pt")
    restored = cls()
    restored.load_state_dict(torch.load(tmp_path / "agg.pt", weights_only=True))
    expected = original.aggregate_sum(2, after_one, second)
    assert restored.aggregate_sum(2, after_one, second).allclose(expected, rtol=0, atol=0)
    assert not cls().aggregate_sum(2, after_one, second).allclose(expected, rtol=0, atol=1e-9), "state must matter"


# ------------------------------------------------------------------ robust rules

HONEST = [
    update(0, 10, w=[1.0, 2.0], b=[0.0]),
    update(1, 10, w=[1.2, 1.8], b=[0.1]),
    update(2, 10, w=[0.9, 2.1], b=[-0.1]),
    update(3, 10, w=[1.1, 2.2], b=[0.2]),
]
ATTACKER = update(4, 1000, w=[-50.0, 80.0], b=[30.0])


def test_median_is_coordinate_wise() -> None:
    new = Median().aggregate(1, GLOBAL, [*HONEST, ATTACKER])
    # medians of (1, 1.2, .9, 1.1, -50) = 1.0; (2, 1.8, 2.1, 2.2, 80) = 2.1; (0, .1, -.1, .2, 30) = 0.1
    np.testing.assert_allclose(new["w"], [1.0 + 1.0, -2.0 + 2.1], rtol=1e-6)
    np.testing.assert_allclose(new["b"], [0.5 + 0.1], rtol=1e-6)


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    new = TrimmedMean(TrimmedMean.Settings(beta=0.2)).aggregate(1, GLOBAL, [*HONEST, ATTACKER])
    # floor(0.2 * 5) = 1 value dropped at each end: w0 sorted (-50, .9, 1, 1.1, 1.2) keeps (.9, 1, 1.1)
    np.testing.assert_allclose(new["w"], [1.0 + 1.0, -2.0 + (2.0 + 2.1 + 2.2) / 3], rtol=1e-6)
    np.testing.assert_allclose(new["b"], [0.5 + (0.0 + 0.1 + 0.2) / 3], rtol=1e-5)


def test_trimmed_mean_refuses_a_beta_that_trims_nothing() -> None:
    with pytest.raises(SpecError, match="trims nothing"):
        TrimmedMean(TrimmedMean.Settings(beta=0.2)).aggregate(1, GLOBAL, HONEST[:3])


def test_krum_scores_and_choice() -> None:
    flat = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])
    # f=1: each row sums its n-f-2 = 2 nearest squared distances
    np.testing.assert_allclose(krum_scores(flat, 1), [1 + 9, 1 + 4, 4 + 9, 1 + 49, 1 + 64])
    new = Krum(Krum.Settings(f=1)).aggregate(1, GLOBAL, [*HONEST, ATTACKER])
    # honest site 0 (1, 2, 0) is closest to the others; the attacker's sample count buys nothing
    chosen = Weights(arrays={k: GLOBAL[k] + HONEST[0].delta[k] for k in GLOBAL.names})
    assert new.allclose(chosen)


def test_multi_krum_averages_the_m_best_equally() -> None:
    new = MultiKrum(MultiKrum.Settings(f=1)).aggregate(1, GLOBAL, [*HONEST, ATTACKER])
    # m defaults to n - f = 4: exactly the honest sites, weighted equally
    mean = {k: np.mean([u.delta[k] for u in HONEST], axis=0) for k in GLOBAL.names}
    np.testing.assert_allclose(new["w"], GLOBAL["w"] + mean["w"], atol=1e-6)
    np.testing.assert_allclose(new["b"], GLOBAL["b"] + mean["b"], rtol=1e-5, atol=1e-7)
    two = MultiKrum(MultiKrum.Settings(f=1, m=2)).aggregate(1, GLOBAL, [*HONEST, ATTACKER])
    assert not two.allclose(new)


def test_krum_needs_2f_plus_3_sites() -> None:
    with pytest.raises(SpecError, match=r"2f \+ 3 = 5 sites, the data has 4"):
        Krum(Krum.Settings(f=1)).aggregate(1, GLOBAL, HONEST)
    info = SiteInfo(0, 4, 10, 2, 2, (5, 5), 8, 1, 1, 0)
    with pytest.raises(SpecError, match="aggregator.settings.f"):
        Krum(Krum.Settings(f=1)).site_stage(info)


def test_robust_aggregators_refuse_a_secure_sum() -> None:
    with pytest.raises(SpecError, match="needs individual updates"):
        Median().aggregate_sum(1, GLOBAL, summed(*HONEST))


# ------------------------------------------------------------------ local-training rules


def _linear(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _ctx(global_weights: Weights, extras: dict[str, Weights] | None = None, round: int = 1) -> RoundContext:
    return RoundContext(0, round, global_weights, torch.Generator().manual_seed(0), dict(extras or {}))


def test_fedprox_adds_mu_times_distance_to_global() -> None:
    module = _linear()
    glob = weights_of(module)
    stage = ProximalStage(mu=0.5)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    stage.prepare(_ctx(glob), module, optimizer)
    with torch.no_grad():
        module.weight.add_(1.0)  # the site has moved away from the global model
    module.weight.grad = torch.full_like(module.weight, 2.0)
    module.bias.grad = None
    stage.transform_gradients(_ctx(glob), list(module.parameters()))
    np.testing.assert_allclose(module.weight.grad.numpy(), np.full((2, 3), 2.0 + 0.5 * 1.0))
    np.testing.assert_allclose(module.bias.grad.numpy(), np.zeros(2))  # at the global point: no pull


def test_fedprox_without_mu_changes_nothing_in_training() -> None:
    info = SiteInfo(0, 3, 10, 3, 2, (5, 5), 8, 1, 1, 0)
    assert FedProx(FedProx.Settings(mu=0.0)).site_stage(info) is None
    assert isinstance(FedProx().site_stage(info), ProximalStage)


def test_fedprox_keeps_local_models_closer_to_the_global_one() -> None:
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    sgd = TrainingSpec(optimizer="sgd", learning_rate=0.5, batch_size=16)
    distances = []
    for stages in ([], [ProximalStage(mu=1.0)]):
        module = _linear()
        glob = weights_of(module)
        LocalTrainer(module, sgd, stages).run(_ctx(glob), x, y, epochs=5)
        distances.append((weights_of(module) - glob).l2_norm())
    assert distances[1] < 0.8 * distances[0]


def _scaffold_round(stage: ScaffoldSiteStage, module: torch.nn.Module, extras: dict[str, Weights], round: int):
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(round))
    y = (x[:, 1] > 0).long()
    glob = weights_of(module)
    ctx = _ctx(glob, extras, round)
    outcome = LocalTrainer(module, TrainingSpec(optimizer="sgd", learning_rate=0.1, batch_size=8), [stage]).run(
        ctx, x, y, epochs=1
    )
    delta = weights_of(module) - glob
    released = stage.transform_update(ctx, ClientUpdate(site=0, round=round, delta=delta, n_samples=40))
    return glob, delta, outcome.steps, released


def test_scaffold_site_matches_option_ii_under_plain_sgd() -> None:
    module = _linear()
    stage = ScaffoldSiteStage()
    names = [n for n, _ in module.named_parameters()]
    server_c = Weights(arrays={n: np.full(p.shape, 0.05) for n, p in module.named_parameters()})
    _scaffold_round(stage, module, {}, 1)  # round 1: c = 0, learns c_i
    c_i = {n: stage.control[n].copy() for n in names}
    glob, delta, steps, released = _scaffold_round(stage, module, {CONTROL: server_c}, 2)
    for name in names:
        # Karimireddy et al. option II: c_i+ = c_i - c + (x - y_i) / (K lr)
        option_ii = c_i[name] - server_c[name] + (-delta[name]) / (steps * 0.1)
        np.testing.assert_allclose(stage.control[name], option_ii, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(released.extras[CONTROL_DELTA][name], stage.control[name] - c_i[name], atol=1e-9)


def test_scaffold_server_updates_c_and_broadcasts_it() -> None:
    agg = Scaffold()
    assert agg.broadcast_extras() == {}
    ups = [
        ClientUpdate(site=i, round=1, delta=weights(w=[float(i)]), n_samples=1, extras={CONTROL_DELTA: weights(w=[d])})
        for i, d in enumerate([0.3, 0.6, 0.9])
    ]
    new = agg.aggregate_sum(1, weights(w=[0.0]), plain_sum(1, ups))
    assert new["w"][0] == pytest.approx(1.0)  # mean of 0, 1, 2
    assert agg.broadcast_extras()[CONTROL]["w"][0] == pytest.approx(0.6)  # c += sum(delta c_i) / N


def test_scaffold_state_round_trips(tmp_path: Path) -> None:
    agg = Scaffold()
    ups = [ClientUpdate(site=0, round=1, delta=weights(w=[1.0]), n_samples=2, extras={CONTROL_DELTA: weights(w=[0.4])})]
    agg.aggregate_sum(1, weights(w=[0.0]), plain_sum(1, ups))
    torch.save(agg.state_dict(), tmp_path / "server.pt")
    restored = Scaffold()
    restored.load_state_dict(torch.load(tmp_path / "server.pt", weights_only=True))
    assert restored.broadcast_extras()[CONTROL].allclose(agg.broadcast_extras()[CONTROL], rtol=0, atol=0)
    assert restored.state_dict()["n_sites"] == 1

    module = _linear()
    site = ScaffoldSiteStage()
    _scaffold_round(site, module, {}, 1)
    torch.save(site.state_dict(), tmp_path / "site.pt")
    again = ScaffoldSiteStage()
    again.load_state_dict(torch.load(tmp_path / "site.pt", weights_only=True))
    assert again.control.keys() == site.control.keys()
    for name in site.control:
        np.testing.assert_array_equal(again.control[name], site.control[name])


def test_scaffold_refuses_update_level_privacy() -> None:
    from types import SimpleNamespace

    from fedcore.components import PrivacyMechanism

    class SiteLevel(PrivacyMechanism):
        """Stands for any mechanism that protects whole sites."""

        name = "site-dp"
        unit = "site"

    components = SimpleNamespace(privacy=[SiteLevel()])
    with pytest.raises(SpecError, match=r"scaffold.*site-dp"):
        Scaffold().check_spec(None, components)  # type: ignore[arg-type]
