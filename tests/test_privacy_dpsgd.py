"""DP-SGD arithmetic: Poisson batches, per-sample clipping (measured), noise, the record-level stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from fedcore.components import RoundContext, SiteInfo
from fedcore.engine.training import LocalTrainer, weights_of
from fedcore.plugins.models import MLP
from fedcore.plugins.privacy.dpsgd import (
    DPSGDParameters,
    clip_and_noise,
    dp_gradient_step,
    linear_chain,
    linear_chain_clipped_sum,
    per_sample_gradients,
    per_sample_norms,
    poisson_batches,
)
from fedcore.plugins.privacy.gaussian import BudgetRefused, GaussianSettings, RecordLevelStage
from fedcore.spec import TrainingSpec


def loss_fn(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction=reduction)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP().build(20, 3)


class NotAChain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def batch(n: int = 32, scale: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 20, generator=g) * scale, torch.randint(0, 3, (n,), generator=g)


def reference_rows(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
    params = list(module.parameters())
    return [list(torch.autograd.grad(loss_fn(module(x[i : i + 1]), y[i : i + 1]), params)) for i in range(len(y))]


def test_per_sample_gradients_match_one_backward_per_row() -> None:
    module, (x, y) = mlp(), batch()
    grads, losses = per_sample_gradients(module, loss_fn, x, y)
    rows = reference_rows(module, x, y)
    for i, row in enumerate(rows):
        for g, r in zip(grads, row, strict=True):
            torch.testing.assert_close(g[i], r, rtol=1e-5, atol=1e-6)
    assert losses.shape == (32,)


def test_per_sample_gradients_are_clipped_in_a_training_step() -> None:
    module, (x, y) = mlp(), batch(scale=20.0)  # large inputs: most rows exceed the norm
    clip = 0.5
    rows = reference_rows(module, x, y)
    norms = torch.tensor([float(torch.sqrt(sum(g.pow(2).sum() for g in row))) for row in rows])
    assert (norms > clip).sum() > 16
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    clipped_norms = norms * factors
    assert float(clipped_norms.max()) <= clip * (1 + 1e-5)
    expected = [sum(factors[i] * rows[i][k] for i in range(len(y))) / 32 for k in range(len(rows[0]))]
    for model in (module, NotAChain()):
        if isinstance(model, NotAChain):
            model.net.load_state_dict(module.state_dict())
        params = DPSGDParameters(0.0, clip, 0.01, 32.0, 1, 1)
        loss = dp_gradient_step(params, loss_fn, bytes(16))(model, x, y)
        got = [p.grad for p in model.parameters()]
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
        assert float(loss) > 0


def test_linear_chain_norms_equal_per_sample_norms() -> None:
    module, (x, y) = mlp(), batch()
    layers = linear_chain(module)
    assert layers is not None and linear_chain(NotAChain()) is None
    summed, norms, _ = linear_chain_clipped_sum(layers, loss_fn, x, y, 1.0)
    per_sample, _ = per_sample_gradients(module, loss_fn, x, y)
    torch.testing.assert_close(norms, per_sample_norms(per_sample), rtol=1e-4, atol=1e-6)
    reference = clip_and_noise(per_sample, 1.0, torch.zeros(sum(p.numel() for p in module.parameters())), 1.0)
    for a, b in zip(summed, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_noise_has_the_calibrated_std() -> None:
    module, (x, y) = mlp(), batch()
    sigma, clip, expected_batch = 1.3, 0.7, 32.0
    clean_params = DPSGDParameters(0.0, clip, 0.01, expected_batch, 1, 1)
    noisy_params = DPSGDParameters(sigma, clip, 0.01, expected_batch, 1, 1)
    dp_gradient_step(clean_params, loss_fn, bytes(16))(module, x, y)
    clean = torch.cat([p.grad.flatten() for p in module.parameters()])
    dp_gradient_step(noisy_params, loss_fn, bytes(16))(module, x, y)
    noisy = torch.cat([p.grad.flatten() for p in module.parameters()])
    noise = ((noisy - clean) * expected_batch).numpy().astype(np.float64)
    assert stats.kstest(noise / (sigma * clip), "norm").pvalue > 1e-3


def test_poisson_batches_include_each_row_with_the_sample_rate() -> None:
    n, q, steps = 2000, 0.02, 400
    x, y = torch.arange(n).float().unsqueeze(1), torch.arange(n)
    sampler = poisson_batches(x, y, q, steps, torch.Generator().manual_seed(3))
    batches = [yb for _, yb in sampler(0)]
    sizes = np.array([len(b) for b in batches])
    assert len(batches) == steps
    assert abs(sizes.mean() - q * n) < 4 * np.sqrt(q * n / steps)
    assert all(len(torch.unique(b)) == len(b) for b in batches)
    hits = np.bincount(torch.cat(batches).numpy(), minlength=n)
    assert abs(hits.mean() / steps - q) < 0.002
    again = [yb for _, yb in poisson_batches(x, y, q, steps, torch.Generator().manual_seed(3))(0)]
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def info(n_train: int = 1600, rounds: int = 3, max_rows: int | None = None) -> SiteInfo:
    return SiteInfo(0, 3, n_train, 20, 3, (800, 600, 200), 32, 1, rounds, 7, max_rows)


def test_record_stage_trains_and_accounts_the_steps_it_ran() -> None:
    settings = GaussianSettings(epsilon=2.0, accountant="rdp")
    stage = RecordLevelStage("gaussian", settings, info())
    module = mlp()
    x, y = batch(1600, scale=1.0)
    trainer = LocalTrainer(module, TrainingSpec(local_epochs=1, batch_size=32), [stage])
    before = weights_of(module)
    outcome = trainer.run(RoundContext(0, 1, before, torch.Generator().manual_seed(0)), x, y, epochs=1)
    assert outcome.steps == stage.dp_parameters.steps_per_epoch == 50
    assert not weights_of(module).allclose(before)
    spent = stage.privacy_spent()
    assert spent.steps == 50 and 0 < spent.epsilon < 2.0
    assert spent.unit == "record" and any("no patient id" in n for n in spent.notes)


def test_budget_is_refused_before_a_round_that_would_exceed_it() -> None:
    stage = RecordLevelStage("gaussian", GaussianSettings(epsilon=1.0, accountant="rdp"), info(rounds=2))
    per_round = stage.dp_parameters.steps_per_round
    stage.accountant.step(stage.dp_parameters.noise_multiplier, stage.dp_parameters.sample_rate, 2 * per_round)
    x, y = batch(1600, scale=1.0)
    with pytest.raises(BudgetRefused, match="above the budget"):
        stage.sampler(RoundContext(0, 3, weights_of(mlp()), torch.Generator()), x, y, 32)


def test_patient_unit_calibrates_the_group_bound() -> None:
    settings = GaussianSettings(epsilon=1.0, accountant="rdp", unit="patient")
    stage = RecordLevelStage("gaussian", settings, info(max_rows=3))
    stage.accountant.step(stage.dp_parameters.noise_multiplier, stage.dp_parameters.sample_rate, 150)
    spent = stage.privacy_spent()
    assert spent.unit == "patient"
    assert 0.99 <= spent.epsilon <= 1.0 and spent.delta <= 1e-5 * (1 + 1e-9)
    record_level = RecordLevelStage("gaussian", GaussianSettings(epsilon=1.0, accountant="rdp"), info(max_rows=3))
    assert stage.dp_parameters.noise_multiplier > record_level.dp_parameters.noise_multiplier


def test_class_weighted_loss_uses_noisy_accounted_counts() -> None:
    settings = GaussianSettings(epsilon=1.0, accountant="rdp", class_weighted_loss=True)
    stage = RecordLevelStage("gaussian", settings, info())
    weights = stage.class_weights(np.array([800, 600, 200]))
    assert weights is not None and weights[2] > weights[0]
    assert stage.accountant.history[0] == (50.0, 1.0, 1)
