"""DP noise drawn by the privacy plugins is secret by default: not derivable from the seed
the report prints, different in every run and arm; identical only in the reproducible mode.

The attack from issue 13: anyone holding the spec regenerated the central-DP noise from
the seed and subtracted it, recovering the exact clipped sum. Reproduced here, it works
in the reproducible mode (which the report flags) and fails by default.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedcore.components import RoundContext, SiteInfo, plain_sum
from fedcore.noise import KEY_BYTES, add_noise
from fedcore.plugins.privacy.central_dp import CentralDP, CentralDPSettings
from fedcore.plugins.privacy.gaussian import Gaussian, GaussianSettings
from fedcore.randomness import Secrets, secret_bytes
from fedcore.testing import run_spec_text
from fedcore.types import ClientUpdate, Weights

SEED = 2024
ARM = "arm-spec-digest"  # the engine uses a digest of the arm's resolved spec, which the run directory holds


def _info(site: int, secrets: Secrets) -> SiteInfo:
    return SiteInfo(site, 3, 1000, 20, 3, (400, 400, 200), 32, 1, 10, SEED, secrets=secrets)


def _updates() -> list[ClientUpdate]:
    rng = np.random.default_rng(1)
    return [
        ClientUpdate(site=s, round=1, delta=Weights(arrays={"w": rng.normal(size=300).astype(np.float32)}), n_samples=1)
        for s in range(3)
    ]


def _central_release(secrets: Secrets, clipping: str = "fixed") -> tuple[np.ndarray, np.ndarray, float]:
    """(the true clipped sum, the released noisy sum, the noise std) of one central-DP round."""
    mechanism = CentralDP(CentralDPSettings(epsilon=1.0, accountant="rdp", clipping=clipping, clip_norm=1.0))
    stages = [mechanism.site_stage(_info(s, secrets)) for s in range(3)]
    context = RoundContext(0, 1, Weights(arrays={}), torch.Generator().manual_seed(0))
    clipped = [stage.transform_update(context, u) for stage, u in zip(stages, _updates())]
    summed = plain_sum(1, clipped)
    noisy = mechanism.transform_sum(summed, np.random.default_rng(0))
    z_update, _ = mechanism.noise_split(3)
    return summed.weighted_delta_sum["w"], noisy.weighted_delta_sum["w"], z_update * 1.0


def _attack(released: np.ndarray, std: float, arm: str = ARM) -> np.ndarray:
    """What someone holding the spec (seed, arm) and the report (noise std) computes."""
    key = secret_bytes(KEY_BYTES, True, SEED, arm, "central-noise", 1)
    noise = add_noise({"w": np.zeros(released.shape, dtype=np.float64)}, std, key)["w"]
    return released.astype(np.float64) - noise


def test_the_seed_attack_recovers_the_sum_only_in_reproducible_mode() -> None:
    true_sum, released, std = _central_release(Secrets(True, SEED, ARM))
    assert np.abs(_attack(released, std) - true_sum).max() < 1e-5  # reproducible: the sum is exposed
    true_sum, released, std = _central_release(Secrets(False, SEED, ARM))
    error = _attack(released, std) - true_sum
    assert np.abs(error).max() > std  # by default the guess is off by noise of the full std...
    assert np.std(error) == pytest.approx(std * np.sqrt(2), rel=0.25)  # ...two independent draws


def test_default_noise_is_fresh_and_reproducible_noise_is_identical() -> None:
    fresh = [_central_release(Secrets(False, SEED, ARM))[1] for _ in range(2)]
    assert not np.allclose(fresh[0], fresh[1])
    same = [_central_release(Secrets(True, SEED, ARM))[1] for _ in range(2)]
    assert np.array_equal(same[0], same[1])


def test_arms_never_share_noise_even_in_reproducible_mode() -> None:
    """Two arms (fixed and adaptive clipping) release the same clipped sum in round 1; with
    shared noise keys, (r1 - S) / s1 = (r2 - S) / s2 would give S from the two releases."""
    s1, r1, std1 = _central_release(Secrets(True, SEED, "arm-fixed"), "fixed")
    s2, r2, std2 = _central_release(Secrets(True, SEED, "arm-adaptive"), "adaptive")
    assert np.array_equal(s1, s2)
    unit1, unit2 = (r1 - s1) / std1, (r2 - s2) / std2
    assert np.corrcoef(unit1, unit2)[0, 1] < 0.3


def test_site_level_noise_and_class_count_noise_are_secret_by_default() -> None:
    def site_release(secrets: Secrets) -> np.ndarray:
        stage = Gaussian(GaussianSettings(level="site", epsilon=1.0, accountant="rdp")).site_stage(_info(0, secrets))
        context = RoundContext(0, 1, Weights(arrays={}), torch.Generator().manual_seed(0))
        return stage.transform_update(context, _updates()[0]).delta["w"]

    assert not np.array_equal(site_release(Secrets(False, SEED, ARM)), site_release(Secrets(False, SEED, ARM)))
    assert np.array_equal(site_release(Secrets(True, SEED, ARM)), site_release(Secrets(True, SEED, ARM)))

    def class_weights(secrets: Secrets) -> np.ndarray:
        settings = GaussianSettings(level="record", epsilon=1.0, accountant="rdp", class_weighted_loss=True)
        stage = Gaussian(settings).site_stage(replace(_info(0, secrets), rounds=1))
        return stage.class_weights(np.array([400, 400, 200]))

    assert not np.array_equal(class_weights(Secrets(False, SEED, ARM)), class_weights(Secrets(False, SEED, ARM)))
    assert np.array_equal(class_weights(Secrets(True, SEED, ARM)), class_weights(Secrets(True, SEED, ARM)))


SPEC = """
name: secret-noise
seed: 11
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 150}}
model: {use: mlp, settings: {hidden: [8]}}
training: {rounds: 2, local_epochs: 1, batch_size: 64}
aggregator: {use: fedavg}
privacy:
  - use: central-dp
    settings: {epsilon: 2.0, delta: 1.0e-3, clip_norm: 0.5}
execution: {progress: false, reproducible_noise: MODE}
"""


def _final_model(tmp_path, name: str, reproducible: bool) -> np.ndarray:
    run_dir = run_spec_text(SPEC.replace("MODE", str(reproducible).lower()), tmp_path / name)
    final = np.load(run_dir / "checkpoints" / "federated-main-r0.npz")
    return np.concatenate([final[k].ravel() for k in sorted(final.files)])


@pytest.mark.slow
def test_two_default_runs_draw_different_noise_two_reproducible_runs_the_same(tmp_path) -> None:
    assert not np.allclose(_final_model(tmp_path, "a", False), _final_model(tmp_path, "b", False))
    assert np.array_equal(_final_model(tmp_path, "c", True), _final_model(tmp_path, "d", True))
