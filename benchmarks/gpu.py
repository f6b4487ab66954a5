"""The paper workload on a CUDA device: captured steps (CUDA graphs) against eager ones, and the
full ``specs/paper.yaml`` timed on the GPU.

    python benchmarks/gpu.py                         # steps, then the paper spec (1 worker x 8 threads, 2 x 4)
    python benchmarks/gpu.py --skip-paper            # the step timings only
    python benchmarks/gpu.py --runs 1x1 --profile    # one paper run, and a profiled one

Prints, in one run:

- the device (name, memory, torch and CUDA versions);
- milliseconds per step of the vectorized engine on the paper's MLP (128-64-32, batch 32,
  Adam) for the shapes ``specs/paper.yaml`` trains: 30 copies with DP-SGD (10 repeats x 3
  sites), 30 without, 10 centralized copies; each eager (the step's FX graph and Adam
  launched from Python) and as replays of a captured CUDA graph, alternating, and their ratio;
- ``fedcore run specs/paper.yaml --set execution.device=cuda`` for each of ``--runs``
  (worker processes x torch threads each: the threads evaluate the models on the CPU): wall
  seconds, CPU seconds and peak RSS of the run's processes, and the report's Table I
  (to compare with the CPU run's in ``docs/speed.md``);
- with ``--profile``: the same run in this process under cProfile, its top functions by
  cumulative time (where a GPU run's seconds go besides training).

Needs a CUDA device. ``--out DIR`` keeps the run directories and the profile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from paper_spec import PAPER

FEATURES, CLASSES = 38, 3  # synthetic-ehr's paper data: 38 model inputs, 3 classes


def describe_device() -> str:
    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}; {os.cpu_count()} CPU cores"
    )


def step_times(copies: int, rows: int, private: bool, pairs: int, device: str = "cuda") -> tuple[float, float]:
    """Milliseconds per step, eager and replayed, of ``copies`` copies on ``rows`` rows each (median of alternating epochs)."""
    from fedcore.components import DPStep
    from fedcore.engine.vectorized import CopyTask, StackedTrainer
    from fedcore.spec import build_components, load_experiment

    experiment = load_experiment(PAPER)
    module = build_components(experiment.spec, experiment.plugins).model.build(FEATURES, CLASSES)
    training = experiment.spec.training
    data = [(torch.randn(rows, FEATURES), torch.randint(0, CLASSES, (rows,))) for _ in range(copies)]
    steps = rows // training.batch_size
    dp = [
        DPStep(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=training.batch_size / rows,
               expected_batch_size=float(training.batch_size), steps_per_epoch=steps)
        for _ in range(copies)
    ] if private else [None] * copies  # fmt: skip
    trainers = {graphs: StackedTrainer(module, training, copies, device=device, cuda_graphs=graphs) for graphs in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    # The first two pairs compile and capture: a first epoch replays one step fewer than
    # the later ones (its first step is the capture's warm-up), so its remainder graph differs.
    warm = 2
    for trial in range(pairs + warm):
        for graphs, trainer in trainers.items():
            tasks = [CopyTask(x, y, torch.Generator().manual_seed(i), dp=d, round=trial + 1) for i, ((x, y), d) in enumerate(zip(data, dp))]
            trainer.reset_optimizer()
            torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train(tasks, 1)
            torch.cuda.synchronize()
            if trial >= warm:
                times[graphs].append((time.perf_counter() - start) / steps * 1e3)
    failures = [b.step.failure for b in trainers[True]._graphs.values() if b.step is not None and b.step.failure]
    if failures:
        print(f"    capture failed, replays ran eagerly: {failures[0]}")
    return sorted(times[False])[len(times[False]) // 2], sorted(times[True])[len(times[True]) // 2]


def table_one(report: Path) -> str:
    lines = report.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## Table I")), None)
    if start is None:
        return "(no Table I in the report)"
    block = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            block.append(line)
    return "\n".join(block)


def paper_run(workers: int, threads: int, out: Path, extra: list[str]) -> dict[str, object]:
    """``fedcore run specs/paper.yaml`` on the GPU in a child process: wall, CPU, peak RSS, Table I."""
    run_dir = out / f"paper-cuda-w{workers}x{threads}"
    command = [
        sys.executable, "-c", "import sys; from fedcore.cli import main; sys.exit(main())",
        "run", str(PAPER), "--set", "execution.device=cuda", "--set", f"execution.threads_per_worker={threads}",
        "--workers", str(workers), "--no-progress", "--out", str(run_dir), *extra,
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)  # noqa: S603
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result: dict[str, object] = {"workers": workers, "threads": threads, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mib": after.ru_maxrss // 1024}
    if done.returncode != 0:
        result["error"] = (done.stdout + done.stderr)[-3000:]
        return result
    summary = json.loads((run_dir / "summary.json").read_text())
    result["run_seconds"] = round(summary["total_seconds"], 1)
    result["table_one"] = table_one(run_dir / "report.md")
    return result


def profiled_run(out: Path, top: int) -> str:
    """The paper spec in this process (one worker) under cProfile: the top functions by cumulative time."""
    from fedcore.engine.runner import run_experiment
    from fedcore.spec import load_experiment

    experiment = load_experiment(PAPER, ["execution.device=cuda"])
    profile = cProfile.Profile()
    start = time.perf_counter()
    how = "complete"
    profile.enable()
    try:
        run_experiment(experiment, out / "paper-cuda-profiled", workers=1, progress=False)
    except KeyboardInterrupt:  # `timeout -s INT`: still print where the time went so far
        how = "interrupted"
    finally:
        profile.disable()
    wall = time.perf_counter() - start
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(top)
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    profile.dump_stats(str(out / "paper-cuda.prof"))
    return f"profiled run ({how}): {wall:.1f} s wall\n{text.getvalue()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="1x8,2x4", help="paper runs as WORKERSxTHREADS, comma-separated")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a spec override for the paper runs")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also one profiled paper run in this process")
    parser.add_argument("--pairs", type=int, default=3, help="alternating eager/replayed epochs per step shape")
    parser.add_argument("--rows", type=int, default=16_000, help="rows per copy in the step timings")
    parser.add_argument("--out", type=Path, default=Path("gpu-bench"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"device: {describe_device()}", flush=True)
    results: dict[str, object] = {"device": describe_device()}
    if not args.skip_steps:
        print("ms per step (median of alternating epochs): eager | CUDA graph | eager / graph", flush=True)
        steps = []
        for label, copies, private in (("federated DP-SGD, 30 copies", 30, True), ("federated, 30 copies", 30, False),
                                       ("centralized, 10 copies", 10, False), ("federated DP-SGD, 3 copies", 3, True)):  # fmt: skip
            eager, graph = step_times(copies, args.rows, private, args.pairs)
            steps.append({"shape": label, "eager_ms": round(eager, 3), "graph_ms": round(graph, 3)})
            print(f"  {label:30s} {eager:8.3f} | {graph:8.3f} | {eager / graph:5.1f}x", flush=True)
        results["steps"] = steps
    if not args.skip_paper:
        runs = []
        for workers, threads in (map(int, r.split("x")) for r in args.runs.split(",")):
            run = paper_run(workers, threads, args.out, [a for o in args.overrides for a in ("--set", o)])
            runs.append(run)
            print(f"paper spec on the GPU, {workers} worker(s) x {threads} thread(s): {run.get('wall_s')} s wall, {run.get('cpu_s')} CPU s, "
                  f"peak RSS {run.get('peak_rss_mib')} MiB (run's own total: {run.get('run_seconds')} s)", flush=True)  # fmt: skip
            print(run.get("table_one") or run.get("error"), flush=True)
        results["paper"] = runs
    if args.profile:
        text = profiled_run(args.out, 45)
        (args.out / "profile.txt").write_text(text)
        print(text, flush=True)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
