"""Captured steps (:mod:`fedcore.engine.cuda_graphs`): an epoch of replays equals the eager epoch.

On a CPU, the captured-step path runs its step body eagerly (no graph is captured there),
which checks everything but the capture itself: the epoch buffers, the step counter on the
device, Adam's step count across epochs and rounds, the loss sums, the noise draws. With a
CUDA device, the same checks run with real graphs, and the graphs must have been captured.
"""

from __future__ import annotations

import pytest
import torch

from fedcore.components import DPStep
from fedcore.engine.vectorized import CopyTask, StackedTrainer
from fedcore.noise import DeviceGaussianNoise
from fedcore.spec import TrainingSpec

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
ROWS, COPIES = 64, 3


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _train(device: str, graphs: bool, dps: list[DPStep] | None) -> tuple[torch.Tensor, list[tuple[int, float]], StackedTrainer]:
    """Two rounds of two epochs of three copies (a fresh optimizer each round, as the engine does)."""
    torch.manual_seed(3)
    data = [(torch.randn(ROWS, 6), torch.randint(0, 3, (ROWS,))) for _ in range(COPIES)]
    start = torch.cat([p.detach().reshape(-1) for p in _mlp().parameters()])
    dtype = torch.float64 if device == "cpu" else torch.float32
    trainer = StackedTrainer(_mlp(), TrainingSpec(batch_size=8, learning_rate=0.01), COPIES, dtype=dtype, device=device)
    trainer.cuda_graphs = graphs  # on a CPU: the captured-step path, run eagerly
    trainer.flat.copy_(start.expand(COPIES, -1))
    outcomes = []
    for round_ in (1, 2):
        trainer.reset_optimizer()
        tasks = [
            CopyTask(x, y, torch.Generator().manual_seed(10 + c), dp=None if dps is None else dps[c], round=round_)
            for c, (x, y) in enumerate(data)
        ]
        outcomes += [(o.steps, o.mean_loss) for o in trainer.train(tasks, 2)]
    return trainer.flat.double().cpu(), outcomes, trainer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("private", [False, True], ids=["non-private", "dp-sgd"])
def test_replayed_epochs_equal_eager_ones(device: str, private: bool) -> None:
    dps = (
        [DPStep(noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=8 / ROWS, expected_batch_size=8.0, steps_per_epoch=8) for _ in range(COPIES)]
        if private
        else None
    )
    eager, eager_outcomes, _ = _train(device, False, dps)
    replayed, replayed_outcomes, trainer = _train(device, True, dps)
    # DP steps run at the epoch's full padded width when replayed (per step's width eagerly):
    # the same sums with more zero rows, so equal to rounding.
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if device == "cpu" else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(replayed, eager, **tolerance)
    assert [s for s, _ in replayed_outcomes] == [s for s, _ in eager_outcomes]
    for (_, a), (_, b) in zip(replayed_outcomes, eager_outcomes, strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    assert not torch.allclose(replayed[0], replayed[1])  # the copies trained on their own data
    steps = [buffers.step for buffers in trainer._graphs.values()]
    assert steps, "no epoch ran as replays"
    if device == "cuda":
        assert all(step.graphs and step.failure is None for step in steps), [s.failure for s in steps]  # type: ignore[union-attr]


@pytest.mark.parametrize("device", DEVICES)
def test_replayed_dp_epochs_are_reproducible(device: str) -> None:
    """Same secrets, same numbers: the registered generators restart with each round's keys."""
    dps = [DPStep(noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=8 / ROWS, expected_batch_size=8.0, steps_per_epoch=8) for _ in range(COPIES)]
    first, _, _ = _train(device, True, dps)
    second, _, _ = _train(device, True, dps)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_reseeding_device_noise_restarts_its_streams() -> None:
    keys = [bytes([i]) * 16 for i in range(3)]
    noise = DeviceGaussianNoise(keys, 50, torch.float32, "cpu")
    generators = list(noise.generators)
    a = noise.draw(torch.empty(3, 50), [1.0, 2.0, 3.0]).clone()
    noise.reseed(keys)
    b = noise.draw(torch.empty(3, 50), [1.0, 2.0, 3.0])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert noise.generators == generators  # the same objects: a captured step keeps drawing from them
    noise.reseed([bytes([9]) * 16, *keys[1:]])
    c = noise.draw(torch.empty(3, 50), [1.0, 2.0, 3.0])
    assert not torch.equal(c[0], a[0]) and torch.equal(c[1:], a[1:])
    with pytest.raises(ValueError, match="2 keys for 3 noise streams"):
        noise.reseed(keys[:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_run_on_the_gpu_matches_the_cpu_run() -> None:
    """The whole federated run (sites of equal size, so every epoch replays captured steps)
    on the GPU ends where the CPU run ends, to float32 rounding."""
    from conftest import TINY_SPEC
    from fedcore.engine.vectorized import EngineOptions, RunJob, run_federated_vectorized
    from fedcore.spec import build_components, load_experiment
    from fedcore.testing import tiny_federated_data

    experiment = load_experiment(text=TINY_SPEC, overrides=["training.rounds=2", "training.local_epochs=2"])
    spec, plugins = experiment.spec, experiment.plugins
    data = tiny_federated_data(sites=3, rows=256, features=5)
    runs = {
        device: run_federated_vectorized(spec, RunJob(build_components(spec, plugins), data, 0, 5), "main", options=EngineOptions(device=device))
        for device in ("cpu", "cuda")
    }
    cpu, gpu = runs["cpu"].final_weights, runs["cuda"].final_weights
    assert cpu is not None and gpu is not None
    assert gpu.allclose(cpu, rtol=1e-3, atol=1e-4)


def test_on_a_gpu_one_process_trains_and_evaluates_with_more_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes would take turns on the GPU: a cuda run defaults to one, evaluating on up to 8 threads."""
    from conftest import TINY_SPEC
    from fedcore.engine.runner import default_workers
    from fedcore.spec import ExecutionSpec, load_experiment

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert ExecutionSpec().torch_threads() == 1
    assert ExecutionSpec(device="cuda").torch_threads() == 8
    assert ExecutionSpec(device="cuda", threads_per_worker=3).torch_threads() == 3
    experiment = load_experiment(text=TINY_SPEC, overrides=["execution.device=cuda", "repeats=4"])
    assert default_workers(experiment, [[object()]] * 8) == 1  # decided before any data is read
