"""The native (C++) MLP step: the written-out steps' numbers, Opacus's clipping, the engine's fallbacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import fedcore.engine.native as native
from fedcore.engine.native import AdamStep, NativeMLPStep
from fedcore.engine.vectorized import CopyTask, StackedTrainer
from fedcore.engine.vectorized_step import CompiledStep, ParamLayout, flat_grads, make_mlp_dp_step, make_mlp_train_step
from fedcore.spec import TrainingSpec
from test_vectorized_dp import _opacus_clipped_gradient

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    """Where a C++ compiler exists (CI, the quick start's machine) the kernel must build."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the engine runs the compiled tensor-operation step")
    assert native.unavailable_reason() is None


def _mlp(activation: type[torch.nn.Module] = torch.nn.ReLU) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(7, 16), activation(), torch.nn.Linear(16, 8), activation(), torch.nn.Linear(8, 3)
    )


def _batch(copies: int, width: int, dtype: torch.dtype, rows: int = 50) -> tuple[torch.Tensor, ...]:
    """Stacked rows, each copy's batch of row ids, labels and weights (zeros on the last padding rows)."""
    g = torch.Generator().manual_seed(copies * 100 + width)
    x_all = torch.randn(rows, 7, generator=g, dtype=dtype) * 2
    index = torch.randint(0, rows, (copies, width), generator=g)
    y = torch.randint(0, 3, (copies, width), generator=g)
    w = torch.rand(copies, width, generator=g, dtype=dtype)
    w[:, width - width // 4 :] = 0
    return x_all, index, y, w


def _params(module: torch.nn.Module, copies: int, dtype: torch.dtype) -> tuple[ParamLayout, torch.Tensor]:
    layout = ParamLayout.of(module)
    return layout, torch.randn(copies, layout.size, generator=torch.Generator().manual_seed(7), dtype=dtype) * 0.4


@pytest.mark.parametrize("activation", [torch.nn.ReLU, torch.nn.Tanh])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_the_plain_step_equals_the_written_out_step(activation: type[torch.nn.Module], dtype: torch.dtype, tol: float) -> None:
    module = _mlp(activation).to(dtype)
    layout, flat = _params(module, 4, dtype)
    x_all, index, y, w = _batch(4, 12, dtype)
    step = NativeMLPStep.of(module, layout, dtype, CPU)
    assert step is not None
    grad = torch.full_like(flat, float("nan"))  # overwritten entirely
    losses = step.train(flat, x_all, index, y, w, grad)
    grads, expected_losses = make_mlp_train_step(module, layout)(layout.views(flat), x_all[index], y, w)  # type: ignore[misc]
    torch.testing.assert_close(grad, flat_grads(grads), rtol=tol, atol=tol)
    torch.testing.assert_close(losses, expected_losses, rtol=tol, atol=tol)


@pytest.mark.parametrize("activation", [torch.nn.ReLU, torch.nn.Tanh])
def test_the_dp_step_adds_the_written_out_clipped_sum_into_the_noise(activation: type[torch.nn.Module]) -> None:
    dtype = torch.float64
    module = _mlp(activation).to(dtype)
    layout, flat = _params(module, 3, dtype)
    x_all, index, y, w = _batch(3, 10, dtype)
    clip = torch.tensor([0.3, 1.0, 50.0], dtype=dtype)  # tight, moderate, no clipping
    row_scale = (w > 0).to(dtype) / 6.0
    noise = torch.randn(3, layout.size, dtype=dtype)
    expected_sum, expected_losses = make_mlp_dp_step(module, layout)(  # type: ignore[misc]
        layout.views(flat), x_all[index], y, w, clip, noise.clone(), row_scale
    )
    out = noise.clone()
    losses = NativeMLPStep.of(module, layout, dtype, CPU).dp(flat, x_all, index, y, w, clip, out, row_scale)  # type: ignore[union-attr]
    torch.testing.assert_close(out, expected_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")
def test_the_dp_step_clips_as_opacus_does() -> None:
    """Each copy's clipped sum over its real rows, divided by the expected batch, is Opacus's gradient."""
    torch.manual_seed(0)
    modules = [_mlp().double(), _mlp().double()]
    layout = ParamLayout.of(modules[0])
    flat = torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in modules])
    x_all, index, y, _ = _batch(2, 8, torch.float64)
    real = [7, 4]
    w = torch.zeros(2, 8, dtype=torch.float64)
    for copy, k in enumerate(real):
        w[copy, :k] = 1.0
    clip = torch.tensor([0.5, 2.0], dtype=torch.float64)
    batch = torch.tensor([5.0, 6.0], dtype=torch.float64)
    out = torch.zeros(2, layout.size, dtype=torch.float64)
    NativeMLPStep.of(modules[0], layout, torch.float64, CPU).dp(flat, x_all, index, y, w, clip, out, w / batch.unsqueeze(1))  # type: ignore[union-attr]
    for copy, k in enumerate(real):
        rows = index[copy, :k]
        expected = _opacus_clipped_gradient(modules[copy], x_all[rows], y[copy, :k], float(clip[copy]), int(batch[copy]))
        torch.testing.assert_close(out[copy], expected, rtol=1e-10, atol=1e-12)


def test_strided_step_slices_and_empty_batches_are_read_as_given() -> None:
    """The engine passes step t of (S, steps, B) plans: rows contiguous, copies strided."""
    dtype = torch.float32
    module = _mlp()
    layout, flat = _params(module, 3, dtype)
    x_all, index, y, w = _batch(3, 3 * 9, dtype)
    plan = [t.view(3, 3, 9) for t in (index, y, w)]
    step = NativeMLPStep.of(module, layout, dtype, CPU)
    got, want = torch.empty_like(flat), torch.empty_like(flat)
    step.train(flat, x_all, *(t[:, 1] for t in plan), got)  # type: ignore[union-attr]
    step.train(flat, x_all, *(t[:, 1].contiguous() for t in plan), want)  # type: ignore[union-attr]
    assert torch.equal(got, want)
    empty = torch.empty(3, 0, dtype=torch.long)
    losses = step.train(flat, x_all, empty, empty, torch.empty(3, 0), got)  # type: ignore[union-attr]
    assert not losses.any() and not got.any()


def test_each_copy_computes_only_its_own_poisson_batch() -> None:
    """With ``sizes``, rows past a copy's own batch are skipped: the same sums and losses as
    computing the zero-weight padding, even where that padding holds garbage row ids."""
    dtype = torch.float64
    module = _mlp()
    layout, flat = _params(module, 3, dtype)
    x_all, index, y, w = _batch(3, 10, dtype)
    sizes = torch.tensor([10, 4, 0])
    for copy, k in enumerate(sizes.tolist()):
        w[copy, k:] = 0
    clip, row_scale = torch.ones(3, dtype=dtype), w / 5.0
    step = NativeMLPStep.of(module, layout, dtype, CPU)
    full = torch.zeros(3, layout.size, dtype=dtype)
    full_losses = step.dp(flat, x_all, index, y, w, clip, full, row_scale)  # type: ignore[union-attr]
    index[1, 4:] = 10**9  # never read
    own = torch.zeros(3, layout.size, dtype=dtype)
    own_losses = step.dp(flat, x_all, index, y, w, clip, own, row_scale, sizes)  # type: ignore[union-attr]
    torch.testing.assert_close(own, full, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(own_losses, full_losses, rtol=1e-13, atol=1e-15)
    assert not own[2].any() and float(own_losses[2]) == 0.0


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_many_steps_in_one_call_equal_one_call_a_step(dp: bool) -> None:
    """``steps``: each copy's steps one after another in one call give the bits of one call
    a step, copy by copy -- with copies at different Adam step counts, taking different
    numbers of the call's steps (the rest report a loss of 0), and DP batches of their own sizes."""
    dtype, S, T, B = torch.float32, 3, 5, 12
    module = _mlp()
    layout, start = _params(module, S, dtype)
    step = NativeMLPStep.of(module, layout, dtype, CPU)
    assert step is not None
    g = torch.Generator().manual_seed(11)
    x_all = torch.randn(80, 7, generator=g, dtype=dtype)
    index = torch.randint(0, 80, (S, T, B), generator=g)
    y = torch.randint(0, 3, (S, T, B), generator=g)
    w = torch.rand(S, T, B, generator=g, dtype=dtype)
    sizes = torch.randint(0, B + 1, (S, T), generator=g)
    noise = torch.randn(T, S, layout.size, generator=g, dtype=dtype) * 0.01
    clip, taken, own_steps = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0, 2, 7]), torch.tensor([5, 3, 0])
    settings = (1e-3, 0.9, 0.999, 0.0, 1e-8)

    flat, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    dp_args = {"noise": noise.clone(), "clip": clip, "row_scale": w / 4, "sizes": sizes} if dp else {}
    losses = step.steps(flat, x_all, index, y, w, AdamStep(m, v, settings, taken.clone()), own_steps, **dp_args)
    assert losses.shape == (S, T) and not losses[1, 3:].any() and not losses[2].any()

    for s in range(S):
        one, m1, v1 = start[s : s + 1].clone(), torch.zeros(1, layout.size), torch.zeros(1, layout.size)
        for t in range(int(own_steps[s])):
            adam = AdamStep(m1, v1, settings, taken[s : s + 1] + t)
            rows = (index[s : s + 1, t], y[s : s + 1, t], w[s : s + 1, t])
            if dp:
                out = noise[t, s : s + 1].clone()
                loss = step.dp(one, x_all, *rows, clip[s : s + 1], out, w[s : s + 1, t] / 4, sizes[s : s + 1, t], adam)
            else:
                loss = step.train(one, x_all, *rows, None, adam)
            assert torch.equal(loss[0], losses[s, t])
        assert torch.equal(one[0], flat[s]) and torch.equal(m1[0], m[s]) and torch.equal(v1[0], v[s])
    assert not torch.equal(flat[0], start[0]) and torch.equal(flat[2], start[2])
    with pytest.raises(RuntimeError, match="needs Adam inside"):
        step._call(flat, x_all, index, y, w, torch.empty(T, S, layout.size), None, None, None, None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_step_draws_the_noise_the_python_streams_would_have_drawn(dtype: torch.dtype) -> None:
    """``streams``: each copy's noise drawn inside the step, at the steps it takes, is what
    GaussianNoise draws for it, to the bit -- from positions inside an AES block too (P here
    has an odd ceil(P/2): a draw ends mid-block) -- and the streams go on from where the step
    left them."""
    from fedcore.noise import GaussianNoise

    if native.noise_library() is None:
        pytest.skip("built without OpenSSL: the noise is drawn in Python and handed to the step")
    S, T, B = 3, 5, 12
    module = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).to(dtype)
    layout, start = _params(module, S, dtype)
    assert (layout.size + 1) // 2 % 2 == 1
    step = NativeMLPStep.of(module, layout, dtype, CPU)
    assert step is not None
    g = torch.Generator().manual_seed(5)
    x_all = torch.randn(80, 7, generator=g, dtype=dtype)
    index, y = torch.randint(0, 80, (S, T, B), generator=g), torch.randint(0, 2, (S, T, B), generator=g)
    w = torch.rand(S, T, B, generator=g, dtype=dtype)
    sizes = torch.randint(0, B + 1, (S, T), generator=g)
    clip, taken, own_steps = torch.tensor([0.5, 1.0, 2.0], dtype=dtype), torch.tensor([0, 2, 7]), torch.tensor([5, 3, 0])
    std, settings = [0.01, 0.02, 0.03], (1e-3, 0.9, 0.999, 0.0, 1e-8)
    keys = [bytes([i + 1]) * 16 for i in range(S)]
    theirs, mine = GaussianNoise(keys, layout.size, dtype), GaussianNoise(keys, layout.size, dtype)
    for noise in (theirs, mine):  # both streams one draw in: mid-block
        noise.draw(torch.empty(S, layout.size, dtype=dtype), std)

    runs = []
    for drawn_inside in (False, True):
        flat, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
        dp = {"clip": clip, "row_scale": w / 4, "sizes": sizes}
        if drawn_inside:
            dp["streams"] = mine.native_streams(std)
        else:
            dp["noise"] = torch.stack([theirs.draw(torch.empty(S, layout.size, dtype=dtype), std, own_steps > t) for t in range(T)])
        losses = step.steps(flat, x_all, index, y, w, AdamStep(m, v, settings, taken.clone()), own_steps, **dp)
        runs.append((flat, m, v, losses))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(runs[1][0][0], start[0]) and torch.equal(runs[1][0][2], start[2])
    assert mine.position.tolist() == theirs.position.tolist() == [8 * ((layout.size + 1) // 2) * (1 + n) for n in (5, 3, 0)]
    after = [noise.draw(torch.empty(S, layout.size, dtype=dtype), std) for noise in (theirs, mine)]
    assert torch.equal(*after)
    with pytest.raises(RuntimeError, match="drawing its noise"):
        step.steps(flat, x_all, index, y, w, AdamStep(m, v, settings, taken.clone()), own_steps, noise=runs[0][0].new_zeros(T, S, layout.size), clip=clip, row_scale=w, streams=mine.native_streams(std))


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_adam_copy_by_copy_rounds_as_torchs_fused_adam(dp: bool, weight_decay: float) -> None:
    """Three steps with Adam inside the native step against the same gradients stepped by
    torch's fused Adam (what torch.optim.Adam(fused=True) runs) over all rows."""
    dtype = torch.float32
    module = _mlp()
    layout, start = _params(module, 3, dtype)
    x_all, index, y, w = _batch(3, 12, dtype)
    step = NativeMLPStep.of(module, layout, dtype, CPU)
    lr, betas, eps = 1e-3, (0.9, 0.999), 1e-8
    mine, theirs = start.clone(), start.clone()
    m1, v1, m2, v2 = (torch.zeros_like(start) for _ in range(4))
    clip, row_scale = torch.ones(3), w / 8.0
    for count in range(1, 4):
        noise = torch.randn(3, layout.size, generator=torch.Generator().manual_seed(count)) * 0.01
        grad = noise.clone() if dp else torch.empty_like(start)
        args = (clip, grad, row_scale) if dp else (grad,)
        (step.dp if dp else step.train)(theirs, x_all, index, y, w, *args)  # type: ignore[union-attr,operator]
        torch._fused_adam_(  # type: ignore[attr-defined]
            [theirs], [grad], [m2], [v2], [], [torch.tensor(float(count))],
            lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
        )  # fmt: skip
        adam = AdamStep(m1, v1, (lr, *betas, weight_decay, eps), torch.full((3,), count - 1))
        grad = noise.clone() if dp else torch.empty_like(start)
        args = (clip, grad, row_scale, None, adam) if dp else (grad, adam)
        (step.dp if dp else step.train)(mine, x_all, index, y, w, *args)  # type: ignore[union-attr,operator]
        for a, b in ((mine, theirs), (m1, m2), (v1, v2)):
            # torch's vectorized loop, whose arithmetic the native Adam follows, covers all
            # but a few tail elements (those round without the fused multiply-add)
            assert float((a == b).double().mean()) > 0.99
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        theirs.copy_(mine), m2.copy_(m1), v2.copy_(v1)
    assert not torch.equal(mine, start)


def test_bad_arguments_raise_instead_of_reading_out_of_bounds() -> None:
    dtype = torch.float32
    module = _mlp()
    layout, flat = _params(module, 2, dtype)
    x_all, index, y, w = _batch(2, 4, dtype)
    step = NativeMLPStep.of(module, layout, dtype, CPU)
    grad = torch.empty_like(flat)
    with pytest.raises(RuntimeError, match="out of range"):
        step.train(flat, x_all, index + len(x_all), y, w, grad)  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="out of range"):
        step.train(flat, x_all, index, y + 3, w, grad)  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="dtype"):
        step.train(flat, x_all, index, y, w.double(), grad)  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="input size"):
        step.train(flat, x_all[:, :5].contiguous(), index, y, w, grad)  # type: ignore[union-attr]


def test_only_plain_mlps_on_the_cpu_in_float_get_it() -> None:
    mlp = _mlp()
    layout = ParamLayout.of(mlp)
    assert NativeMLPStep.of(mlp, layout, torch.float32, CPU) is not None
    assert NativeMLPStep.of(mlp, layout, torch.float16, CPU) is None
    assert NativeMLPStep.of(mlp, layout, torch.float32, torch.device("meta")) is None
    normed = torch.nn.Sequential(torch.nn.Linear(7, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    assert NativeMLPStep.of(normed, ParamLayout.of(normed), torch.float32, CPU) is None
    training = TrainingSpec(local_epochs=1, batch_size=8)
    assert StackedTrainer(mlp, training, 2).native is not None
    assert StackedTrainer(mlp, training, 2, backend="script").native is None


def test_it_can_be_turned_off_and_a_failed_build_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV, "0")
    assert "FEDCORE_NATIVE=0" in native._load()
    monkeypatch.delenv(native.ENV)
    monkeypatch.setattr(native, "SOURCES", (native.SOURCES[0].with_name("missing.cpp"),))
    assert native._load()  # a reason, no exception
    monkeypatch.setattr(native, "_loaded", "no compiler")
    assert native.unavailable_reason() == "no compiler"
    assert StackedTrainer(_mlp(), TrainingSpec(local_epochs=1, batch_size=8), 2).native is None


def test_each_build_has_its_own_folder_and_lands_in_one_rename(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A build killed halfway (its folder and torch's lock file left behind) blocks nothing:
    the next build uses a fresh folder. The compiler's child process is replaced by a fake
    here (the real build is what every other test here loads)."""
    monkeypatch.setenv("FEDCORE_CACHE", str(tmp_path))
    target = native.library_path()
    assert target.parent == tmp_path / "native"
    stale = target.parent / ".build-killed"
    stale.mkdir(parents=True)
    (stale / "lock").touch()  # what a killed torch build leaves
    folders = []

    def fake_child(code: str, args: list[str], timeout: float) -> None:  # a fake compiler
        assert "_compile" in code and timeout == native.BUILD_TIMEOUT_S
        folders.append(args[0])
        (Path(args[0]) / "fedcore_native.so").write_bytes(b"built")

    monkeypatch.setattr(native, "_run_child", fake_child)
    native._build(target)
    assert target.read_bytes() == b"built"
    assert len(folders) == 1 and Path(folders[0]).parent == target.parent and Path(folders[0]) != stale
    assert not Path(folders[0]).exists()  # the private folder is gone
    assert native.library_path() == target  # same sources, flags, versions: the same name
    monkeypatch.setattr(native, "_run_child", lambda *args: None)  # a compiler that made nothing
    with pytest.raises(RuntimeError, match="no library"):
        native._build(tmp_path / "other.so")


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_a_build_that_hangs_is_stopped_with_its_process_group(tmp_path, monkeypatch: pytest.MonkeyPatch, ignores_sigterm: bool) -> None:
    """The compiler runs in its own process group under a time limit: past it the group is
    asked to stop (ninja then stops the compilers it started in groups of their own), then
    killed, and the build fails with a reason instead of holding up the run."""
    import time

    monkeypatch.setattr(native, "_STOP_GRACE_S", 0.5)
    marker = tmp_path / "grandchild.pid"
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignores_sigterm else ""
    hang = (
        f"import signal, subprocess, sys, time; {ignore}"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(60)"
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="longer than 2 s"):
        native._run_child(hang, [str(marker)], timeout=2)
    assert time.monotonic() - started < 20
    grandchild = int(marker.read_text())
    for _ in range(50):  # reaped by init once killed
        if not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the compiler's own children outlived the time limit")
    with pytest.raises(RuntimeError, match="boom"):
        native._run_child("import sys; print('boom'); sys.exit(3)", [], timeout=30)


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_training_with_it_equals_training_with_the_compiled_steps(dp: bool) -> None:
    """Whole epochs through StackedTrainer (shuffled or Poisson batches, uneven copies, Adam),
    native against TorchScript, float64: the same parameters to rounding."""
    from fedcore.components import DPStep

    torch.manual_seed(3)
    training = TrainingSpec(local_epochs=1, batch_size=8, learning_rate=0.01)
    data = [(torch.randn(n, 7, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (64, 41)]
    start = torch.cat([p.detach().reshape(-1) for p in _mlp().parameters()]).double()
    results = []
    for backend in ("auto", "script"):
        trainer = StackedTrainer(_mlp(), training, 2, dtype=torch.float64, backend=backend)  # type: ignore[arg-type]
        assert (trainer.native is not None) == (backend == "auto")
        trainer.flat.copy_(start.expand(2, -1))
        tasks = [
            CopyTask(
                x, y, torch.Generator().manual_seed(10 + i),
                dp=DPStep(
                    noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=8 / len(y), expected_batch_size=8.0,
                    steps_per_epoch=len(y) // 8, secret=bytes([i + 1]) * 32,
                ) if dp else None,
            )  # fmt: skip
            for i, (x, y) in enumerate(data)
        ]
        outcomes = trainer.train(tasks, 2)
        results.append((trainer.flat.clone(), [(o.steps, o.mean_loss) for o in outcomes]))
    (native_flat, native_outcomes), (script_flat, script_outcomes) = results
    torch.testing.assert_close(native_flat, script_flat, rtol=1e-10, atol=1e-12)
    assert [s for s, _ in native_outcomes] == [s for s, _ in script_outcomes]
    assert [m for _, m in native_outcomes] == pytest.approx([m for _, m in script_outcomes], rel=1e-10)


@pytest.mark.parametrize("hidden", [(128, 64, 32), (256, 160)], ids=["paper", "wide"])
@pytest.mark.parametrize("dp", [False, True])
def test_a_copys_numbers_do_not_depend_on_its_row(dp: bool, hidden: tuple[int, ...]) -> None:
    """Identical copies in every row of the stack get bit-identical results: MKL rounds
    differently at different alignments, and each row of the (S, P) buffers has its own
    (the paper's P = 15,427), so without the step's aligned buffers a copy's numbers would
    depend on which copies train beside it, and so on the run's grouping into workers.
    (libxsmm's kernels round the same at any alignment; the wide MLP's 64 x 256 x 160
    products are past their size and run on MKL within a libxsmm build.)"""
    widths = (38, *hidden)
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    module = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], 3))
    layout = ParamLayout.of(module)
    copies, width = 4, 32 if hidden[0] == 128 else 64
    g = torch.Generator().manual_seed(3)
    flat = (torch.randn(layout.size, generator=g) * 0.1).repeat(copies, 1).contiguous()
    x_all = torch.randn(500, 38, generator=g)
    index = torch.randint(0, 500, (1, width), generator=g).repeat(copies, 1)
    y = torch.randint(0, 3, (1, width), generator=g).repeat(copies, 1)
    w = torch.full((copies, width), 1 / width)
    step = NativeMLPStep.of(module, layout, torch.float32, CPU)
    assert step is not None
    if dp:
        out = (torch.randn(layout.size, generator=g) * 0.01).repeat(copies, 1).contiguous()
        losses = step.dp(flat, x_all, index, y, w, torch.full((copies,), 0.5), out, w.clone())
    else:
        out = torch.empty_like(flat)
        losses = step.train(flat, x_all, index, y, w, out)
    for row in range(1, copies):
        assert torch.equal(out[row], out[0]), f"row {row} differs from row 0 by {float((out[row] - out[0]).abs().max()):.3g}"
        assert torch.equal(losses[row], losses[0])


def test_products_past_libxsmms_size_equal_the_written_out_step() -> None:
    """A 64-row batch through a 256-160 MLP: its largest products run on MKL, the others on
    libxsmm (where the build has it); the numbers are the written-out step's."""
    dtype = torch.float64
    module = torch.nn.Sequential(torch.nn.Linear(7, 256), torch.nn.ReLU(), torch.nn.Linear(256, 160), torch.nn.Tanh(), torch.nn.Linear(160, 3))
    module = module.to(dtype)
    layout, flat = _params(module, 2, dtype)
    flat *= 0.2
    x_all, index, y, w = _batch(2, 64, dtype)
    step = NativeMLPStep.of(module, layout, dtype, CPU)
    assert step is not None
    grad = torch.full_like(flat, float("nan"))
    losses = step.train(flat, x_all, index, y, w, grad)
    grads, expected_losses = make_mlp_train_step(module, layout)(layout.views(flat), x_all[index], y, w)  # type: ignore[misc]
    torch.testing.assert_close(grad, flat_grads(grads), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-12, atol=1e-12)


def test_adams_division_by_its_root_is_one_double_product() -> None:
    """The float32 step's Adam computes sqrt(v) / sqrt(1 - beta2^t) as one double product with
    the divisor's reciprocal, rounded to float once (mlp_step.cpp says why that is exact):
    the same bits as the float division, at every step count of long runs for three beta2,
    over values of every magnitude, and over every significand for three of the divisors."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = (rng.random(600) * 2.0 ** rng.integers(-60, 40, 600)).astype(np.float32)
    for beta2 in (0.999, 0.99, 0.9999):
        roots = np.unique(np.sqrt(1 - beta2 ** np.arange(1, 30_001, dtype=np.float64)).astype(np.float32))
        quotient = x[None, :] / roots[:, None]  # float32 division, correctly rounded
        product = (x[None, :].astype(np.float64) * (1.0 / roots.astype(np.float64))[:, None]).astype(np.float32)
        assert np.array_equal(quotient, product), beta2
    every = (np.float32(1) + np.arange(2**23, dtype=np.float32) * np.float32(2.0**-23)).astype(np.float32)
    for root in np.sqrt(1 - 0.999 ** np.array([1.0, 7.0, 1000.0])).astype(np.float32):
        assert np.array_equal(every / root, (every.astype(np.float64) * (1.0 / np.float64(root))).astype(np.float32))


def test_libxsmm_computes_the_products_where_it_is_found() -> None:
    """Where libxsmm's header and library are found (CI installs Debian's package), the
    build links it and the step's products are its kernels; else MKL's."""
    library = native.matmul_library()
    assert library is not None
    if native.libxsmm_prefix() is None:
        assert library == "BLAS"
    else:
        assert library.startswith("libxsmm ")


def test_processes_started_after_it_are_not_pinned_to_a_core() -> None:
    """libxsmm's initialization sets OMP_PROC_BIND=TRUE in the C environment; a worker
    process inheriting it pins its OpenMP thread to the first core, so that every worker of
    a run shared one core. Loading the native code leaves the environment as it was."""
    import subprocess
    import sys

    assert native.unavailable_reason() is None
    code = "import os, torch; torch.ones(1000).sum(); print(os.environ.get('OMP_PROC_BIND'), sorted(os.sched_getaffinity(0)))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    import os

    assert child.stdout.split(None, 1) == ["None", f"{sorted(os.sched_getaffinity(0))}\n"]


@pytest.mark.slow
def test_without_libxsmm_it_builds_on_mkl_with_the_same_numbers(tmp_path: Path) -> None:
    """``FEDCORE_LIBXSMM=0`` (or no libxsmm on the machine): a build of its own, whose
    products are MKL's, passes the numbers' tests too."""
    import os
    import subprocess
    import sys

    if native.libxsmm_prefix() is None:
        pytest.skip("no libxsmm here: the build under test is already MKL's")
    env = {**os.environ, "FEDCORE_LIBXSMM": "0", "FEDCORE_CACHE": str(tmp_path)}
    tests = ["equals_the_written_out", "adds_the_written_out", "clips_as_opacus", "rounds_as_torchs", "do_not_depend", "computes_the_products"]
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", " or ".join(tests)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stdout[-3000:]
    assert (tmp_path / "native").is_dir()


def test_with_adam_inside_a_plain_step_needs_no_gradient_buffer() -> None:
    """grad=None: the gradients stay inside the step; the parameters and moments are the
    same as when they are written out too."""
    dtype = torch.float32
    module = _mlp()
    layout, start = _params(module, 3, dtype)
    x_all, index, y, w = _batch(3, 12, dtype)
    step = NativeMLPStep.of(module, layout, dtype, CPU)
    assert step is not None
    runs = []
    for grad in (torch.empty_like(start), None):
        flat, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
        for count in (1, 2):
            losses = step.train(flat, x_all, index, y, w, grad, AdamStep(m, v, (1e-3, 0.9, 0.999, 0.0, 1e-8), torch.full((3,), count - 1)))
        runs.append((flat, m, v, losses))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="pass grad"):
        step.train(start.clone(), x_all, index, y, w, None)
