"""Simulated attacks: what each misbehaving site releases, and spec checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcore.components import RoundContext, SiteInfo
from fedcore.errors import SpecError
from fedcore.plugins.attacks import fedcore_attacks
from fedcore.plugins.attacks.poisoning import LabelFlip, RandomNoise, Scale, SignFlip
from fedcore.spec import load_experiment
from fedcore.types import ClientUpdate, Weights

INFO = SiteInfo(site=1, n_sites=3, n_train=10, n_features=2, n_classes=3, class_counts=(4, 3, 3),
                batch_size=4, local_epochs=1, rounds=2, seed=11)
CTX = RoundContext(1, 1, Weights(arrays={}), torch.Generator().manual_seed(0))
UPDATE = ClientUpdate(
    site=1,
    round=1,
    delta=Weights(arrays={"w": np.float32([0.5, -1.0]), "steps": np.int64([7])}),
    n_samples=10,
    extras={"other": Weights(arrays={"c": np.float32([1.0])})},
)


@pytest.mark.parametrize("cls", fedcore_attacks(), ids=lambda c: c.name)
def test_every_attack_follows_the_component_contract(cls: type) -> None:
    assert cls.Settings.model_fields["sites"].is_required()
    settings = cls.Settings(sites=[0])
    assert settings.model_config.get("frozen") is True and settings.model_config.get("extra") == "forbid"
    assert cls.name and (cls.__doc__ or "").strip()


def test_sign_flip_releases_minus_scale_times_the_update() -> None:
    stage = SignFlip(SignFlip.Settings(sites=[1], scale=10)).site_stage(INFO)
    out = stage.transform_update(CTX, UPDATE)
    np.testing.assert_array_equal(out.delta["w"], np.float32([-5.0, 10.0]))
    assert out.delta["steps"][0] == 7  # counters are not a signal
    assert out.extras == UPDATE.extras
    np.testing.assert_array_equal(UPDATE.delta["w"], np.float32([0.5, -1.0]))  # input untouched


def test_scale_boosts_the_update() -> None:
    out = Scale(Scale.Settings(sites=[1], factor=4)).site_stage(INFO).transform_update(CTX, UPDATE)
    np.testing.assert_array_equal(out.delta["w"], np.float32([2.0, -4.0]))


def test_random_noise_is_seeded_and_replaces_or_adds() -> None:
    replace = RandomNoise(RandomNoise.Settings(sites=[1], std=2.0))
    a = replace.site_stage(INFO).transform_update(CTX, UPDATE)
    b = replace.site_stage(INFO).transform_update(CTX, UPDATE)
    np.testing.assert_array_equal(a.delta["w"], b.delta["w"])  # same seed and site, same noise
    big = ClientUpdate(site=1, round=1, delta=Weights(arrays={"w": np.zeros(20000, np.float32)}), n_samples=10)
    noise = replace.site_stage(INFO).transform_update(CTX, big).delta["w"]
    assert noise.std() == pytest.approx(2.0, rel=0.03)
    added = RandomNoise(RandomNoise.Settings(sites=[1], std=1e-3, mode="add")).site_stage(INFO)
    np.testing.assert_allclose(added.transform_update(CTX, UPDATE).delta["w"], UPDATE.delta["w"], atol=0.01)


def test_label_flip_maps_classes_and_keeps_inputs() -> None:
    stage = LabelFlip(LabelFlip.Settings(sites=[1])).site_stage(INFO)
    x, y = torch.zeros(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    x2, y2 = stage.transform_training_data(CTX, x, y)
    assert y2.tolist() == [2, 1, 0, 2, 1, 0]
    assert y.tolist() == [0, 1, 2, 0, 1, 2] and x2 is x


def test_label_flip_fraction_poisons_the_same_rows_each_round() -> None:
    stage = LabelFlip(LabelFlip.Settings(sites=[1], fraction=0.3)).site_stage(INFO)
    y = torch.zeros(5000, dtype=torch.long)
    first = stage.transform_training_data(CTX, torch.zeros(5000, 1), y)[1]
    second = stage.transform_training_data(CTX, torch.zeros(5000, 1), y)[1]
    assert torch.equal(first, second)
    assert float((first == 2).float().mean()) == pytest.approx(0.3, abs=0.03)


def test_settings_reject_bad_site_lists() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        SignFlip.Settings(sites=[1, 1])
    with pytest.raises(ValueError, match="start at 0"):
        SignFlip.Settings(sites=[-1])
    with pytest.raises(ValueError):
        SignFlip.Settings(sites=[])


SPEC = """\
name: attacked
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 100}}
attacks:
  - {use: label-flip, settings: {sites: [0]}}
  - {use: sign-flip, settings: {sites: [SITE], scale: 10}}
"""


def test_spec_refuses_an_attack_on_a_site_that_does_not_exist() -> None:
    with pytest.raises(SpecError) as caught:
        load_experiment(None, text=SPEC.replace("SITE", "3"))
    assert "attacks.1.settings.sites" in str(caught.value) and "0..2" in str(caught.value)
    experiment = load_experiment(None, text=SPEC.replace("SITE", "2"))
    assert [a.use for a in experiment.spec.attacks] == ["label-flip", "sign-flip"]


def test_site_stage_refuses_out_of_range_sites_when_only_the_data_knows_the_count() -> None:
    with pytest.raises(SpecError, match="has 3 sites"):
        SignFlip(SignFlip.Settings(sites=[1, 5])).site_stage(INFO)


def test_unknown_attack_name_lists_the_choices() -> None:
    with pytest.raises(Exception, match="sign-flip"):
        load_experiment(None, text=SPEC.replace("SITE", "1").replace("use: sign-flip", "use: sign-flipp"))
