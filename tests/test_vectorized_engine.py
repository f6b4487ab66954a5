"""The vectorized engine: equal to plain PyTorch (float64), to the sequential engine, and honest about limits."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_SPEC
from fedcore.components import LocalTrainingStage
from fedcore.engine.simulation import derive_seed, run_centralized, run_federated
from fedcore.engine.vectorized import (
    CopyTask,
    RunJob,
    StackedTrainer,
    run_centralized_vectorized,
    run_federated_vectorized,
    run_repeats_vectorized,
    unsupported_reason,
)
from fedcore.engine.vectorized_step import (
    CompiledStep,
    ParamLayout,
    make_autograd_train_step,
    make_ghost_dp_step,
    make_mlp_dp_step,
    make_mlp_train_step,
    make_train_step,
    mlp_layers,
)
from fedcore.plugins.aggregators.fedavg import FedAvg
from fedcore.spec import TrainingSpec, build_components, load_experiment
from fedcore.testing import tiny_federated_data


def _mlp(features: int = 5, classes: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(features, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, classes)
    )


def _plain_local_training(
    start: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    training: TrainingSpec,
    class_weight: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """One site's round as anyone would write it: torch.optim, randperm, slices, backward."""
    model = _mlp().double()
    model.load_state_dict(start)
    params = list(model.parameters())
    if training.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    elif training.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=training.learning_rate, momentum=training.momentum, weight_decay=training.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(training.local_epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), training.batch_size):
            idx = perm[i : i + training.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx], weight=class_weight).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "training",
    [
        TrainingSpec(local_epochs=3, batch_size=16, optimizer="adam", learning_rate=0.01),
        TrainingSpec(local_epochs=3, batch_size=16, optimizer="adamw", learning_rate=0.01, weight_decay=0.1),
        TrainingSpec(local_epochs=3, batch_size=16, optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=0.01),
    ],
    ids=["adam", "adamw", "sgd-momentum"],
)
def test_one_round_in_float64_equals_plain_pytorch(training: TrainingSpec) -> None:
    """Sites of different sizes (partial batches, copies idle while others finish the epoch)
    and a class-weighted loss at one site: every copy must end where plain PyTorch ends."""
    torch.manual_seed(0)
    sizes = [101, 64, 37]
    data = [(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in sizes]
    class_weights = [None, torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64), None]
    start = {k: v.double() for k, v in _mlp().state_dict().items()}
    seeds = [derive_seed(11, 1, site) for site in range(len(sizes))]

    trainer = StackedTrainer(_mlp(), training, len(sizes), dtype=torch.float64)
    row = torch.cat([v.reshape(-1) for v in start.values()])
    trainer.flat.copy_(row.expand(len(sizes), -1))
    tasks = [
        CopyTask(x, y, torch.Generator().manual_seed(seed), cw)
        for (x, y), seed, cw in zip(data, seeds, class_weights, strict=True)
    ]
    outcomes = trainer.train(tasks, training.local_epochs)

    for copy, ((x, y), seed, cw) in enumerate(zip(data, seeds, class_weights, strict=True)):
        expected = _plain_local_training(start, x, y, seed, training, cw)
        got = trainer.layout.views(trainer.flat)
        for (name, want), have in zip(expected.items(), got, strict=True):
            torch.testing.assert_close(have[copy], want, rtol=1e-10, atol=1e-12, msg=f"copy {copy} {name}")
        assert outcomes[copy].steps == training.local_epochs * -(-sizes[copy] // training.batch_size)


def test_every_compile_level_computes_the_same_step() -> None:
    torch.manual_seed(1)
    module = _mlp()
    layout = ParamLayout.of(module)
    flat = torch.randn(4, layout.size, dtype=torch.float64)
    x, y = torch.randn(4, 8, 5, dtype=torch.float64), torch.randint(0, 3, (4, 8))
    w = torch.full((4, 8), 1 / 8, dtype=torch.float64)
    module = module.double()
    outputs = {}
    for backend in ("eager", "fx", "script"):
        step = CompiledStep(make_train_step(module, layout), backend)  # type: ignore[arg-type]
        outputs[backend] = step(layout.views(flat), x, y, w)
        assert step.level(layout.views(flat), x, y, w) == backend
    for backend in ("fx", "script"):
        torch.testing.assert_close(outputs[backend], outputs["eager"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("activation", [torch.nn.ReLU, torch.nn.Tanh])
def test_the_written_out_mlp_steps_equal_autograd(activation: type[torch.nn.Module]) -> None:
    """A plain MLP's hand-written backward pass (non-private and DP ghost clipping) against
    autograd through vmap, in float64, with padding rows and per-copy weights."""
    torch.manual_seed(2)
    module = torch.nn.Sequential(
        torch.nn.Linear(5, 9), activation(), torch.nn.Linear(9, 7), activation(), torch.nn.Linear(7, 3)
    ).double()
    layout = ParamLayout.of(module)
    views = layout.views(torch.randn(4, layout.size, dtype=torch.float64))
    x, y = torch.randn(4, 10, 5, dtype=torch.float64), torch.randint(0, 3, (4, 10))
    w = torch.rand(4, 10, dtype=torch.float64)
    w[:, 7:] = 0  # padding rows
    (grads, losses), (want, want_losses) = (
        factory(module, layout)(views, x, y, w)  # type: ignore[misc]
        for factory in (make_mlp_train_step, make_autograd_train_step)
    )
    torch.testing.assert_close(losses, want_losses, rtol=1e-12, atol=0)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    clip, noise = torch.tensor([0.1, 0.5, 1.0, 100.0], dtype=torch.float64), torch.randn(4, layout.size, dtype=torch.float64)
    scale = (w > 0).double() / 8
    (dp, dp_losses), (dp_want, dp_want_losses) = (
        factory(module, layout)(views, x, y, w, clip, noise.clone(), scale)  # type: ignore[misc]
        for factory in (make_mlp_dp_step, make_ghost_dp_step)
    )
    torch.testing.assert_close(dp, dp_want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dp_losses, dp_want_losses, rtol=1e-12, atol=0)


def test_one_graph_serves_every_batch_width_when_it_holds_no_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The written-out DP step compiles once for all Poisson batch widths; autograd's graph
    (it holds fixed-size views) is checked before reuse. Every width computes what eager does."""
    torch.manual_seed(3)
    module = _mlp().double()
    layout = ParamLayout.of(module)
    views = layout.views(torch.randn(3, layout.size, dtype=torch.float64))
    for factory, compiles_expected in ((make_mlp_dp_step, 1), (make_ghost_dp_step, None)):
        step = CompiledStep(factory(module, layout))  # type: ignore[arg-type]
        compiled: list[int] = []
        real_compile = step._compile
        monkeypatch.setattr(step, "_compile", lambda args, real=real_compile: compiled.append(1) or real(args))
        for width in (8, 12, 4):
            x, y = torch.randn(3, width, 5, dtype=torch.float64), torch.randint(0, 3, (3, width))
            w = torch.ones(3, width, dtype=torch.float64)
            args = (views, x, y, w, torch.ones(3, dtype=torch.float64), torch.randn(3, layout.size, dtype=torch.float64), w / 4)
            want = step.fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
            got = step(*args)
            assert step.level(*args) == "script"
            for g, e in zip(got, want, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
        assert compiles_expected is None or len(compiled) == compiles_expected, factory.__name__


def test_only_plain_mlps_take_the_written_out_step() -> None:
    from fedcore.plugins.models import MLP, MLPSettings

    def layers(*modules: torch.nn.Module) -> list[object] | None:
        module = torch.nn.Sequential(*modules)
        return mlp_layers(module, ParamLayout.of(module))

    plugin = MLP(MLPSettings(hidden=[8, 4])).build(5, 3)
    assert len(mlp_layers(plugin, ParamLayout.of(plugin)) or []) == 3
    sigmoid = MLP(MLPSettings(hidden=[4], binary_output="sigmoid")).build(5, 2)
    assert mlp_layers(sigmoid, ParamLayout.of(sigmoid)) is None
    assert layers(torch.nn.Linear(5, 3)) is not None  # logistic regression
    assert layers(torch.nn.Linear(5, 4), torch.nn.GELU(), torch.nn.Linear(4, 3)) is None
    assert layers(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(4, 3)) is None
    assert layers(torch.nn.Linear(5, 4, bias=False), torch.nn.ReLU(), torch.nn.Linear(4, 3)) is None
    assert layers(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)) is None
    assert layers(torch.nn.Linear(5, 4), torch.nn.ReLU()) is None  # no logits layer last


def _tiny(spec_overrides: list[str]):
    experiment = load_experiment(text=TINY_SPEC, overrides=spec_overrides)
    return experiment.spec, experiment.plugins


def test_a_run_matches_the_sequential_engine_record_for_record() -> None:
    spec, plugins = _tiny(["training.rounds=2", "training.local_epochs=2"])
    data = tiny_federated_data(sites=3, rows=230, features=5)
    sequential = run_federated(spec, RunJob(build_components(spec, plugins), data, 0, 5), "main")
    seen = []
    vectorized = run_federated_vectorized(spec, RunJob(build_components(spec, plugins), data, 0, 5), "main", on_round=seen.append)
    assert [r.round for r in seen] == [1, 2]
    for a, b in zip(sequential.records, vectorized.records, strict=True):
        assert (a.round, a.epoch, a.mode, a.update_bytes) == (b.round, b.epoch, b.mode, b.update_bytes)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert a.validation.loss == pytest.approx(b.validation.loss, rel=1e-4)
        assert [e.site for e in a.per_site] == [e.site for e in b.per_site]
    assert sequential.final_weights is not None and vectorized.final_weights is not None
    assert sequential.final_weights.allclose(vectorized.final_weights, rtol=1e-4, atol=1e-5)


def test_repeats_trained_together_equal_repeats_trained_alone() -> None:
    spec, plugins = _tiny(["training.rounds=2", "training.local_epochs=1"])
    datas = [tiny_federated_data(sites=3, rows=150 + 40 * r, features=5, seed=r) for r in range(2)]
    together = run_repeats_vectorized(
        spec, [RunJob(build_components(spec, plugins), d, r, 9 + r) for r, d in enumerate(datas)], "main"
    )
    for r, data in enumerate(datas):
        alone = run_federated_vectorized(spec, RunJob(build_components(spec, plugins), data, r, 9 + r), "main")
        assert together[r].repeat == r
        assert together[r].final_weights.allclose(alone.final_weights, rtol=1e-5, atol=1e-6)  # type: ignore[union-attr]


def test_centralized_baseline_matches_the_sequential_one() -> None:
    spec, plugins = _tiny(["baseline.epochs=3"])
    data = tiny_federated_data(sites=2, rows=200, features=5)
    sequential = run_centralized(spec, RunJob(build_components(spec, plugins), data, 0, 4), "main")
    (vectorized,) = run_centralized_vectorized(spec, [RunJob(build_components(spec, plugins), data, 0, 4)], "main")
    assert [r.epoch for r in vectorized.records] == [1, 2, 3]
    assert sequential.final_weights.allclose(vectorized.final_weights, rtol=1e-5, atol=1e-6)  # type: ignore[union-attr]
    for a, b in zip(sequential.records, vectorized.records, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)


class _ProximalStage(LocalTrainingStage):
    """Changes gradients every step (as FedProx does)."""

    def transform_gradients(self, ctx, parameters):
        for p in parameters:
            p.grad.mul_(0.5)


class _StepwiseFedAvg(FedAvg):
    """FedAvg whose sites transform every gradient: only the sequential engine runs it."""

    name: ClassVar[str] = "stepwise-fedavg"

    def site_stage(self, site):
        return _ProximalStage()


def test_unsupported_reason_names_what_blocks_vectorizing() -> None:
    spec, plugins = _tiny([])
    data = tiny_federated_data(sites=2, rows=100, features=6)
    assert unsupported_reason(spec, build_components(spec, plugins), data) is None

    dropout, _ = _tiny(["model.settings.dropout=0.2"])
    reason = unsupported_reason(dropout, build_components(dropout, plugins), data)
    assert reason is not None and "dropout" in reason

    components = build_components(spec, plugins)
    components.aggregator = _StepwiseFedAvg()
    reason = unsupported_reason(spec, components, data)
    assert reason is not None and "transform_gradients" in reason


class _StepwiseAtSiteTwo(FedAvg):
    """FedAvg with a per-step stage at site 2 only (neither site 0 nor an attacked site)."""

    name: ClassVar[str] = "stepwise-at-two"

    def site_stage(self, site):
        return _ProximalStage() if site.site == 2 else None


def test_a_per_step_stage_at_any_site_is_refused_and_the_site_named() -> None:
    spec, plugins = _tiny([])
    data = tiny_federated_data(sites=3, rows=100, features=6)
    components = build_components(spec, plugins)
    components.aggregator = _StepwiseAtSiteTwo()
    reason = unsupported_reason(spec, components, data)
    assert reason is not None and reason.startswith("site 2:") and "transform_gradients" in reason
    with pytest.raises(ValueError, match="site 2"):
        run_federated_vectorized(spec, RunJob(components, data, 0, 1), "main")


def test_the_engine_and_why_are_recorded_per_arm(tmp_path) -> None:
    from fedcore.engine.runner import run_experiment
    from fedcore.report import Summary

    text = TINY_SPEC + "sweep: {model.settings.dropout: [0.0, 0.2]}\n"
    experiment = load_experiment(text=text, overrides=["training.rounds=1"])
    run_dir = run_experiment(experiment, out=tmp_path / "run", workers=1, progress=False)
    setups = {arm.label: arm.setup for arm in Summary.read(run_dir / "summary.json").arms}
    assert [s.engine for s in setups.values()] == ["vectorized", "sequential"]
    reason = list(setups.values())[1].engine_reason
    assert reason is not None and "dropout" in reason
    assert reason in (run_dir / "report.md").read_text()


def test_copies_with_uneven_data_skip_steps_without_touching_their_optimizer() -> None:
    """A copy with one batch per epoch must equal that copy trained alone."""
    torch.manual_seed(3)
    training = TrainingSpec(local_epochs=2, batch_size=8, learning_rate=0.01)
    small = (torch.randn(8, 5), torch.randint(0, 3, (8,)))
    big = (torch.randn(40, 5), torch.randint(0, 3, (40,)))
    start = torch.cat([v.reshape(-1) for v in _mlp().state_dict().values()])
    together = StackedTrainer(_mlp(), training, 2)
    together.flat.copy_(start.expand(2, -1))
    together.train([CopyTask(*small, torch.Generator().manual_seed(1)), CopyTask(*big, torch.Generator().manual_seed(2))], 2)
    alone = StackedTrainer(_mlp(), training, 1)
    alone.flat.copy_(start.unsqueeze(0))
    alone.train([CopyTask(*small, torch.Generator().manual_seed(1))], 2)
    torch.testing.assert_close(together.flat[0], alone.flat[0], rtol=1e-6, atol=1e-7)


def test_copies_stepped_in_row_blocks_equal_one_block_bit_for_bit() -> None:
    """The CPU step runs on blocks of copies (``copies_per_call``): any blocking gives every
    copy exactly the numbers of one call for all (uneven data, idle copies, a last short block)."""
    torch.manual_seed(4)
    training = TrainingSpec(local_epochs=2, batch_size=8, learning_rate=0.01)
    data = [(torch.randn(n, 5), torch.randint(0, 3, (n,))) for n in (8, 40, 13, 27, 8, 33, 21)]
    start = torch.cat([v.reshape(-1) for v in _mlp().state_dict().values()])
    results = []
    for per_call in (128, 2):
        trainer = StackedTrainer(_mlp(), training, len(data), copies_per_call=per_call)
        trainer.flat.copy_(start.expand(len(data), -1))
        tasks = [CopyTask(x, y, torch.Generator().manual_seed(i)) for i, (x, y) in enumerate(data)]
        results.append((trainer.blocks, trainer.train(tasks, 2), trainer.flat.clone()))
    (one, outcomes_one, flat_one), (blocks, outcomes_blocked, flat_blocked) = results
    assert one == [(0, 7)] and blocks == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert torch.equal(flat_one, flat_blocked)
    assert outcomes_one == outcomes_blocked


def test_site_data_tensors_are_not_modified() -> None:
    data = tiny_federated_data(sites=2, rows=100, features=6)
    before = [s.x_train.copy() for s in data.sites]
    spec, plugins = _tiny(["training.rounds=1"])
    run_federated_vectorized(spec, RunJob(build_components(spec, plugins), data, 0, 1), "main")
    for b, s in zip(before, data.sites, strict=True):
        np.testing.assert_array_equal(b, s.x_train)


def test_stacked_rows_are_kept_while_the_same_tensors_come_in() -> None:
    """A federated run's sites train on the same tensors every round: their stacked rows are
    reused, and stacked again once a tensor is another one or was changed in place."""
    trainer = StackedTrainer(_mlp(), TrainingSpec(batch_size=4), 2)
    parts = [torch.randn(5, 5), torch.randn(3, 5)]
    first = trainer._stacked("x", parts, torch.float32)
    assert torch.equal(first, torch.cat(parts))
    assert trainer._stacked("x", list(parts), torch.float32) is first
    assert trainer._stacked("x", parts, torch.float64) is not first
    parts[1].add_(1.0)  # changed in place
    again = trainer._stacked("x", parts, torch.float32)
    assert again is not first and torch.equal(again, torch.cat(parts))
    other = [parts[0], parts[1].clone()]
    assert trainer._stacked("x", other, torch.float32) is not again


FULL_SPEC = """\
name: full
seed: 21
repeats: 3
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 600}}
model: {use: mlp, settings: {hidden: [16]}}
training: {rounds: 2, local_epochs: 1, batch_size: 32}
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "privacy",
    ["", "privacy: [{use: gaussian, settings: {level: record, epsilon: 3.0, delta: 1.0e-5, max_grad_norm: 1.0, accountant: rdp}}]\n"],
    ids=["non-private", "dp-sgd"],
)
def test_full_runs_reach_the_sequential_accuracy_within_one_repeat_sd(privacy: str) -> None:
    experiment = load_experiment(text=FULL_SPEC + privacy)
    spec, plugins = experiment.spec, experiment.plugins
    seeds = [spec.seed + r for r in range(spec.repeats)]
    datas = [build_components(spec, plugins).dataset.load(s) for s in seeds]
    sequential = [
        run_federated(spec, RunJob(build_components(spec, plugins), d, r, s), "main").records[-1].test.accuracy
        for r, (d, s) in enumerate(zip(datas, seeds, strict=True))
    ]
    jobs = [RunJob(build_components(spec, plugins), d, r, s) for r, (d, s) in enumerate(zip(datas, seeds, strict=True))]
    vectorized = [r.records[-1].test.accuracy for r in run_repeats_vectorized(spec, jobs, "main")]
    sd = float(np.std(sequential, ddof=1))
    assert abs(float(np.mean(vectorized)) - float(np.mean(sequential))) <= sd + 1e-9, (sequential, vectorized)
    if not privacy:
        np.testing.assert_allclose(vectorized, sequential, atol=2e-3)
