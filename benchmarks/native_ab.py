"""What fedcore's native code (``fedcore.engine.native``) buys, in alternating pairs in one process.

    .venv/bin/python benchmarks/native_ab.py              # 5 pairs of each
    .venv/bin/python benchmarks/native_ab.py --trials 9
    .venv/bin/python benchmarks/native_ab.py --matmul     # libxsmm's kernels against MKL's
    .venv/bin/python benchmarks/native_ab.py --blocks     # many steps a call against one
    .venv/bin/python benchmarks/native_ab.py --noise      # DP noise drawn inside the step against handed to it

Two A/B comparisons on the paper workload (3 sites x 40,000 training rows, MLP 128-64-32,
Adam, batch 32; one repeat, 1 local epoch a round, one thread), each alternating its two
sides so that both see the same state of a shared machine:

- the vectorized engine's round with the native MLP step against the same round with the
  TorchScript step it falls back to (no compiler, or ``FEDCORE_NATIVE=0``), non-private and
  DP-SGD: CPU seconds a round (medians) and the speed-up;
- the DP noise (:class:`fedcore.noise.GaussianNoise`, AES-CTR bits and Box-Muller) with the
  native transform against numpy's ufuncs: nanoseconds a value for one step's draw of
  3 x 15,427 float32 values, and the same for the AES keystream alone.

``--matmul`` compares instead the native step's two sources of matrix products, libxsmm's
kernels and MKL's BLAS (``FEDCORE_LIBXSMM=0``): one library is loaded per process, so each
side's rounds run in a child process of its own, the sides alternating (non-private and DP-SGD,
CPU seconds a round, medians over the children of each side's median round).

``--blocks`` compares, alternating in one process, the native step taking blocks of steps of
each copy in one call (the default: a copy's state stays in cache across its steps, the DP
noise is drawn a block ahead) with one call a step (blocks of one step), on 5 repeats trained
together as a paper worker trains them (15 DP-SGD copies; 5 centralized-sized copies would
be the other group): CPU seconds a repeat-round, the noise's helper thread included.

``--noise`` compares, alternating in one process on the same 5 repeats, DP-SGD rounds whose
noise the native step draws itself (OpenSSL's AES-CTR, each copy's noise right before each of
its steps; the default where the build found OpenSSL) with rounds whose noise is drawn in
Python a block of steps ahead and handed to the step (the build without OpenSSL), and the
non-private round beside them: CPU seconds a repeat-round and DP-SGD's ratio to non-private.

The native side runs what a default install runs where a C++ compiler exists; the other is
what runs without one. Nothing here is a timed test: the figures go to ``docs/speed.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from engine_speed import experiment, load, vectorized_round


@contextlib.contextmanager
def without_native() -> Iterator[None]:
    """Within the block, the engine and the noise run as where the native code cannot build."""
    import fedcore.engine.vectorized as vectorized
    import fedcore.noise as noise

    step, transform = vectorized.NativeMLPStep.of, noise.gaussian_from_bits
    vectorized.NativeMLPStep.of = classmethod(lambda cls, *args: None)  # type: ignore[method-assign,assignment]
    noise.gaussian_from_bits = lambda: None  # type: ignore[assignment]
    try:
        yield
    finally:
        vectorized.NativeMLPStep.of = step  # type: ignore[method-assign]
        noise.gaussian_from_bits = transform


def round_pairs(exp, data, seed: int, trials: int) -> tuple[float, float]:
    """Medians of alternating native / fallback rounds, CPU seconds."""
    native, fallback = [], []
    for _ in range(trials):
        native.append(vectorized_round(exp, [data], [seed]).cpu)
        with without_native():
            fallback.append(vectorized_round(exp, [data], [seed]).cpu)
    return float(np.median(native)), float(np.median(fallback))


def per_value(draw: Callable[[], object], values: int, repeats: int = 400) -> float:
    """Nanoseconds a value of ``draw`` (thread CPU time over ``repeats`` calls)."""
    draw()
    start = time.thread_time()
    for _ in range(repeats):
        draw()
    return (time.thread_time() - start) / repeats / values * 1e9


def noise_pairs(trials: int, sites: int = 3, width: int = 15_427) -> tuple[float, float, float]:
    """Medians of alternating native / numpy draws and of the keystream alone, ns a value."""
    from fedcore.noise import GaussianNoise

    keys = [os.urandom(16) for _ in range(sites)]
    out = torch.empty(sites, width)
    native = GaussianNoise(keys, width, torch.float32)
    with without_native():
        fallback = GaussianNoise(keys, width, torch.float32)
    zeros, stream = bytes(4 * width), bytearray(4 * (width + 8))
    std = [1.0] * sites
    a, b, bits = [], [], []
    for _ in range(trials):
        a.append(per_value(lambda: native.draw(out, std), sites * width))
        b.append(per_value(lambda: fallback.draw(out, std), sites * width))
        bits.append(per_value(lambda: [e.update_into(zeros, stream) for e in native._encryptors], sites * width))
    return float(np.median(a)), float(np.median(b)), float(np.median(bits))


def rounds_here(rounds: int) -> dict[str, object]:
    """This process's native step: median CPU seconds of ``rounds`` non-private and DP-SGD
    rounds (after one of each to warm up), and what computed its matrix products."""
    from fedcore.engine.native import matmul_library

    exp, exp_dp = experiment(rounds=1, epochs=1), experiment(rounds=1, epochs=1, dp=True)
    data = load(exp, 2024)
    out: dict[str, object] = {"library": matmul_library()}
    for label, e in (("non-private", exp), ("DP-SGD", exp_dp)):
        vectorized_round(e, [data], [2024])
        out[label] = float(np.median([vectorized_round(e, [data], [2024]).cpu for _ in range(rounds)]))
    return out


def matmul_pairs(trials: int, rounds: int = 3) -> None:
    """libxsmm's kernels against MKL's BLAS in the native step, alternating child processes."""
    sides: dict[str, list[dict[str, object]]] = {"libxsmm": [], "MKL": []}
    for _ in range(trials):
        for side in sides:
            env = {**os.environ, **({"FEDCORE_LIBXSMM": "0"} if side == "MKL" else {})}
            child = subprocess.run(
                [sys.executable, __file__, "--child-rounds", str(rounds)], env=env, capture_output=True, text=True, timeout=900,
                check=True,
            )  # fmt: skip
            sides[side].append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"native step's matrix products, vectorized round, 1 repeat, 1 local epoch, CPU seconds "
          f"(medians over {trials} alternating child processes of each, {rounds} rounds each):")
    print(f"  libxsmm side: {sides['libxsmm'][0]['library']}; MKL side: {sides['MKL'][0]['library']}")
    for label in ("non-private", "DP-SGD"):
        fast = float(np.median([float(r[label]) for r in sides["libxsmm"]]))  # type: ignore[arg-type]
        slow = float(np.median([float(r[label]) for r in sides["MKL"]]))  # type: ignore[arg-type]
        print(f"  {label:12s} libxsmm {fast:.3f}, MKL {slow:.3f}: {slow / fast:.2f}x faster")


@contextlib.contextmanager
def one_step_a_call() -> Iterator[None]:
    """Within the block, the native step is called once a step (blocks of one step)."""
    import fedcore.engine.vectorized as vectorized

    saved = vectorized._STEPS_PER_CALL, vectorized._NOISE_BLOCK_BYTES
    vectorized._STEPS_PER_CALL, vectorized._NOISE_BLOCK_BYTES = 1, 1
    try:
        yield
    finally:
        vectorized._STEPS_PER_CALL, vectorized._NOISE_BLOCK_BYTES = saved


def blocks_pairs(trials: int, repeats: int = 5) -> None:
    """Blocks of steps a native call against one step a call, alternating in this process."""
    seeds = [2024 + r for r in range(repeats)]
    exp, exp_dp = experiment(rounds=1, epochs=1), experiment(rounds=1, epochs=1, dp=True)
    datas = [load(exp, seed) for seed in seeds]
    print(f"native step, {repeats} repeats trained together, 1 local epoch, CPU seconds a repeat-round "
          f"(medians of {trials} alternating pairs):")
    for label, e in (("non-private", exp), ("DP-SGD", exp_dp)):
        blocks, single = [], []
        for _ in range(trials):
            blocks.append(vectorized_round(e, datas, seeds).cpu)
            with one_step_a_call():
                single.append(vectorized_round(e, datas, seeds).cpu)
        fast, slow = float(np.median(blocks)), float(np.median(single))
        print(f"  {label:12s} blocks of steps {fast:.3f}, one step a call {slow:.3f}: {slow / fast:.2f}x faster")


@contextlib.contextmanager
def noise_handed_over() -> Iterator[None]:
    """Within the block, DP-SGD's noise is drawn in Python and handed to the native step."""
    import fedcore.engine.vectorized as vectorized

    saved = vectorized.noise_library
    vectorized.noise_library = lambda: None  # type: ignore[assignment]
    try:
        yield
    finally:
        vectorized.noise_library = saved


def noise_inside_pairs(trials: int, repeats: int = 5) -> None:
    """DP-SGD's noise drawn inside the native step against handed to it, alternating in this process."""
    from fedcore.engine.native import noise_library

    if noise_library() is None:
        raise SystemExit("the native step was built without OpenSSL here: its noise is always handed over")
    seeds = [2024 + r for r in range(repeats)]
    exp, exp_dp = experiment(rounds=1, epochs=1), experiment(rounds=1, epochs=1, dp=True)
    datas = [load(exp, seed) for seed in seeds]
    vectorized_round(exp_dp, datas, seeds)  # warm-up
    inside, handed, plain = [], [], []
    for _ in range(trials):
        inside.append(vectorized_round(exp_dp, datas, seeds).cpu)
        with noise_handed_over():
            handed.append(vectorized_round(exp_dp, datas, seeds).cpu)
        plain.append(vectorized_round(exp, datas, seeds).cpu)
    a, b, c = (float(np.median(x)) for x in (inside, handed, plain))
    print(f"native step, {repeats} repeats trained together, 1 local epoch, CPU seconds a repeat-round "
          f"(medians of {trials} alternating triples; noise: {noise_library()}):")
    print(f"  DP-SGD, noise drawn inside the step {a:.3f}, handed to it {b:.3f}: {b / a:.2f}x faster")
    print(f"  non-private {c:.3f}: DP-SGD / non-private {a / c:.2f}x (noise handed over: {b / c:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="alternating pairs of each comparison")
    parser.add_argument("--matmul", action="store_true", help="libxsmm's matrix products against MKL's, in child processes")
    parser.add_argument("--blocks", action="store_true", help="blocks of steps a native call against one step a call")
    parser.add_argument("--noise", action="store_true", help="DP noise drawn inside the native step against handed to it")
    parser.add_argument("--child-rounds", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from fedcore.engine.native import unavailable_reason

    if (reason := unavailable_reason()) is not None:
        raise SystemExit(f"the native code is unavailable here, nothing to compare: {reason}")
    torch.set_num_threads(1)
    if args.child_rounds:
        print(json.dumps(rounds_here(args.child_rounds)))
        return
    if args.matmul:
        matmul_pairs(args.trials)
        return
    if args.blocks:
        blocks_pairs(args.trials)
        return
    if args.noise:
        noise_inside_pairs(args.trials)
        return
    seed = 2024
    exp, exp_dp = experiment(rounds=1, epochs=1), experiment(rounds=1, epochs=1, dp=True)
    data = load(exp, seed)
    for e in (exp, exp_dp):  # warm-up: each side compiles its steps once per process
        vectorized_round(e, [data], [seed])
        with without_native():
            vectorized_round(e, [data], [seed])
    print(f"vectorized round, 1 repeat, 1 local epoch, CPU seconds (medians of {args.trials} alternating pairs):")
    ratios = {}
    for label, e in (("non-private", exp), ("DP-SGD", exp_dp)):
        native, fallback = round_pairs(e, data, seed, args.trials)
        ratios[label] = native
        print(f"  {label:12s} native step {native:.3f}, TorchScript step {fallback:.3f}: {fallback / native:.2f}x faster")
    print(f"  DP-SGD / non-private with the native code: {ratios['DP-SGD'] / ratios['non-private']:.2f}x")
    native, fallback, bits = noise_pairs(args.trials)
    print(f"DP noise, one step of 3 x 15,427 float32 values, ns a value (medians of {args.trials} alternating pairs):")
    print(f"  native transform {native:.2f}, numpy ufuncs {fallback:.2f}: {fallback / native:.2f}x faster; "
          f"of which the AES-CTR keystream {bits:.2f}")


if __name__ == "__main__":
    main()
