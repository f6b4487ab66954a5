"""DP-SGD in the vectorized engine against plain Opacus: clipping, noise scale, Poisson sampling."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from fedcore.components import DPStep
from fedcore.engine.vectorized import CopyTask, StackedTrainer
from fedcore.engine.vectorized_step import CompiledStep, ParamLayout, make_dp_step
from fedcore.sampling import poisson_batches
from fedcore.spec import TrainingSpec


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))


def _linear_chain() -> torch.nn.Module:
    """All-Linear but not a plain MLP (a layer without bias): the autograd ghost-norm path."""
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12, bias=False), torch.nn.ReLU(), torch.nn.Linear(12, 3)
    )


def _normed() -> torch.nn.Module:
    """Not all-Linear: takes the generic vmap(grad) per-sample path."""
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _opacus_clipped_gradient(
    module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float, expected_batch_size: int
) -> torch.Tensor:
    """Plain Opacus: GradSampleModule + DPOptimizer without noise, one step's gradient."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(module)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
    )
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.pre_step()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")
@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("factory", [_mlp, _linear_chain, _normed], ids=["mlp-written-out", "ghost-linear", "vmap-generic"])
def test_clipped_per_sample_gradients_equal_opacus(backend: str, factory) -> None:
    """Two copies, different batches, padding rows: each copy's step equals Opacus's."""
    torch.manual_seed(0)
    modules = [factory().double(), factory().double()]
    layout = ParamLayout.of(modules[0])
    flat = torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in modules])
    real = [7, 4]
    width = 8
    x = torch.randn(2, width, 6, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (2, width))
    w = torch.zeros(2, width, dtype=torch.float64)
    for copy, k in enumerate(real):
        w[copy, :k] = 1.0
    clip = torch.tensor([0.5, 2.0], dtype=torch.float64)
    scale = torch.tensor([5.0, 6.0], dtype=torch.float64)
    noise = torch.zeros(2, layout.size, dtype=torch.float64)
    step = CompiledStep(make_dp_step(modules[0], layout), backend)  # type: ignore[arg-type]
    grads, loss_sums = step(layout.views(flat), x, y, w, clip, noise, w / scale.unsqueeze(1))
    for copy, k in enumerate(real):
        expected = _opacus_clipped_gradient(
            modules[copy], x[copy, :k], y[copy, :k], float(clip[copy]), int(scale[copy])
        )
        torch.testing.assert_close(grads[copy], expected, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            mean_loss = F.cross_entropy(modules[copy](x[copy, :k]), y[copy, :k])
        assert float(loss_sums[copy]) / k == pytest.approx(float(mean_loss), rel=1e-10)


def test_an_empty_batch_releases_only_the_noise() -> None:
    """The step adds the noise it is given (the engine draws it as N(0, (sigma*C/B)^2); its
    distribution is tested in test_noise.py)."""
    torch.manual_seed(1)
    module = _mlp()
    layout = ParamLayout.of(module)
    clip, expected_batch = 0.7, 4.0
    flat = torch.zeros(2, layout.size)
    step = CompiledStep(make_dp_step(module, layout), "eager")
    noise = torch.randn(2, layout.size)
    drawn = noise.clone()  # the step may add into its noise buffer
    x, y, w = torch.randn(2, 8, 6), torch.randint(0, 3, (2, 8)), torch.zeros(2, 8)
    grads, _ = step(layout.views(flat), x, y, w, torch.full((2,), clip), noise, w / expected_batch)
    torch.testing.assert_close(grads, drawn)


@pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")
def test_the_engine_noise_on_each_copy_is_opacus_sigma_c_over_the_expected_batch() -> None:
    """End to end through StackedTrainer: batches so sparse that every one is empty release
    only noise; with SGD at learning rate 1 a step moves each parameter by minus the noise,
    whose spread must be Opacus's sigma * C / expected batch size, per copy, and whose
    distribution must be the one plain Opacus releases."""
    module = torch.nn.Linear(100, 100)
    configs = [
        DPStep(
            noise_multiplier=sigma, max_grad_norm=clip, sample_rate=1e-12, expected_batch_size=batch, steps_per_epoch=1,
            secret=bytes([k]) * 32,  # fixed keys: the statistical checks below are deterministic
        )
        for k, (sigma, clip, batch) in enumerate(((1.1, 1.0, 32.0), (0.7, 3.0, 8.0)))
    ]
    trainer = StackedTrainer(module, TrainingSpec(optimizer="sgd", learning_rate=1.0, batch_size=8), 2)
    start = trainer.flat.clone()
    tasks = [
        CopyTask(torch.randn(40, 100), torch.randint(0, 3, (40,)), torch.Generator().manual_seed(s), dp=dp)
        for s, dp in zip((5, 6), configs, strict=True)
    ]
    assert [o.steps for o in trainer.train(tasks, 1)] == [1, 1]
    for copy, dp in enumerate(configs):
        released = (start[copy] - trainer.flat[copy]).double() / (dp.noise_multiplier * dp.max_grad_norm / dp.expected_batch_size)
        # Spread within 4 standard errors (a 5 % error in the scale is 7 of them), normal shape.
        assert abs(float(released.std()) - 1.0) < 4 / math.sqrt(2 * released.numel())
        assert abs(float(released.mean())) < 4 / math.sqrt(released.numel())
        assert stats.kstest(released.numpy(), "norm").pvalue > 1e-3
        # The same release from plain Opacus: its DPOptimizer stepping on a batch whose
        # per-sample gradients are all zero; the two samples come from one distribution.
        opacus = _opacus_noise_release(dp, width=100).double() / (dp.noise_multiplier * dp.max_grad_norm / dp.expected_batch_size)
        assert stats.ks_2samp(released.numpy(), opacus.numpy()).pvalue > 1e-3
        assert float(released.std() / opacus.std()) == pytest.approx(1.0, abs=6 / math.sqrt(released.numel()))


def _opacus_noise_release(dp: DPStep, width: int) -> torch.Tensor:
    """What one Opacus DP-SGD step moves a Linear(width, width) by when every per-sample
    gradient is zero: SGD at learning rate 1 on (0 + N(0, (sigma C)^2)) / B."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(11)
    model = GradSampleModule(torch.nn.Linear(width, width))
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=int(dp.expected_batch_size),
    )
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    (model(torch.randn(4, width)) * 0.0).sum().backward()
    optimizer.step()
    return before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("n,rate", [(5000, 0.0064), (40, 0.4)], ids=["rejection", "bernoulli-mask"])
def test_poisson_batches_include_each_row_independently_with_the_sample_rate(n: int, rate: float) -> None:
    steps = 3000
    batches = poisson_batches(n, rate, steps, torch.Generator().manual_seed(7))
    sizes = (batches >= 0).sum(dim=1).double()
    # Binomial(n, q) batch sizes: mean and variance.
    mean, var = n * rate, n * rate * (1 - rate)
    assert abs(float(sizes.mean()) - mean) < 4 * math.sqrt(var / steps)
    assert float(sizes.var()) == pytest.approx(var, rel=0.1)
    # No row twice in one batch.
    for row in batches[:200]:
        real = row[row >= 0]
        assert len(real.unique()) == len(real)
    # Every row included about steps * q times (chi-square over rows, 5 sd margin).
    counts = torch.bincount(batches[batches >= 0], minlength=n).double()
    expected = steps * rate
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < n + 5 * math.sqrt(2 * n)


def test_dp_training_is_reproducible_and_independent_of_its_companions() -> None:
    """A copy's DP run depends only on its own generator, not on the copies beside it."""
    torch.manual_seed(2)
    training = TrainingSpec(local_epochs=1, batch_size=8, learning_rate=0.01)
    data = [(torch.randn(n, 6), torch.randint(0, 3, (n,))) for n in (64, 40)]
    dps = [
        DPStep(noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=8 / n, expected_batch_size=8.0, steps_per_epoch=n // 8)
        for n in (64, 40)
    ]
    start = torch.cat([p.detach().reshape(-1) for p in _mlp().parameters()])

    def train(copies: list[int]) -> torch.Tensor:
        trainer = StackedTrainer(_mlp(), training, len(copies))
        trainer.flat.copy_(start.expand(len(copies), -1))
        tasks = [CopyTask(*data[c], torch.Generator().manual_seed(10 + c), dp=dps[c]) for c in copies]
        outcomes = trainer.train(tasks, 2)
        assert [o.steps for o in outcomes] == [2 * dps[c].steps_per_epoch for c in copies]
        return trainer.flat.clone()

    both = train([0, 1])
    torch.testing.assert_close(both, train([0, 1]), rtol=0, atol=0)
    torch.testing.assert_close(both[1], train([1])[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both[0], start)


DP_SPEC = """\
name: tiny-dp
seed: 3
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 600}}
model: {use: mlp, settings: {hidden: [16]}}
training: {rounds: 2, local_epochs: 2, batch_size: 32}
privacy: [{use: gaussian, settings: {level: record, epsilon: 4.0, delta: 1.0e-5, max_grad_norm: 1.0, accountant: rdp}}]
execution: {reproducible_noise: REPRODUCIBLE}
"""


def _both_engines(reproducible: bool) -> tuple[Any, Any]:
    from fedcore.engine.simulation import RunJob, run_federated
    from fedcore.engine.vectorized import run_federated_vectorized, unsupported_reason
    from fedcore.spec import build_components, load_experiment

    experiment = load_experiment(text=DP_SPEC.replace("REPRODUCIBLE", str(reproducible).lower()))
    spec = experiment.spec
    data = build_components(spec, experiment.plugins).dataset.load(3)
    assert unsupported_reason(spec, build_components(spec, experiment.plugins), data) is None
    sequential = run_federated(spec, RunJob(build_components(spec, experiment.plugins), data, 0, 3), "main")
    vectorized = run_federated_vectorized(spec, RunJob(build_components(spec, experiment.plugins), data, 0, 3), "main")
    return sequential, vectorized


def _flat(result: Any) -> np.ndarray:
    arrays = result.final_weights.arrays
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in sorted(arrays)])


def test_in_reproducible_mode_both_engines_draw_the_same_batches_and_noise() -> None:
    """Same secret, same round: the same Poisson batches and the same noise in both engines,
    so the DP runs agree to float rounding; the same stages give the same epsilon."""
    sequential, vectorized = _both_engines(reproducible=True)
    for a, b in zip(sequential.records, vectorized.records, strict=True):
        assert [p.model_dump() for p in a.privacy] == [p.model_dump() for p in b.privacy]
        assert a.privacy and 0 < a.privacy[0].epsilon <= 4.0
    assert vectorized.records[-1].privacy[0].steps == 2 * 2 * -(-480 // 32)
    np.testing.assert_allclose(_flat(sequential), _flat(vectorized), rtol=0, atol=2e-5)
    assert sequential.records[-1].test.accuracy == pytest.approx(vectorized.records[-1].test.accuracy, abs=1e-9)


def test_by_default_each_run_draws_its_own_secret_noise() -> None:
    sequential, vectorized = _both_engines(reproducible=False)
    assert np.abs(_flat(sequential) - _flat(vectorized)).max() > 1e-3
