"""Benchmark of ``tvlab reproduce`` on this machine: wall time, memory, throughput, MFU.

    python benchmarks/bench_reproduce.py              # everything (about 10 minutes on 2 cores)
    python benchmarks/bench_reproduce.py --quick      # 3 tasks, smaller sets

Each measurement runs in its own subprocess so that its peak RSS is its own:

* ``full``: the paper's whole protocol (18 tasks; 50 test, 50 dev, 100 baseline sets)
  on the default model, float32 and bfloat16, through the fast path.
* ``plain-vs-fast``: the same subset of tasks through the fast path and through the
  plain per-example loop (one prompt per forward; each layer of the sweep a full forward),
  side by side in one process: speed ratio and share of identical predictions.
* MFU: forward FLOPs done per second (``ForwardStats.flops``) over this machine's
  matrix-multiply throughput, measured in the same process before the run, after each task
  (each block of tasks on a GPU) and at the end; the probes' time is left out of the run time.
  On a shared host the same matmul's speed varies from minute to minute, so ``mfu`` divides by
  the highest reading (a lower MFU, never a higher one) and ``mfu_median_peak`` by the median,
  the throughput the run typically had.

Results are printed as a table and written to ``benchmarks/results/<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 6, device: str = "cpu") -> float:
    """FLOP/s of a large square matmul in ``dtype`` on ``device`` (best of ``repeats``)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def run_full(dtype: str, tasks: list[str] | None, config_kwargs: dict) -> dict:
    import tvlab

    probes = [matmul_peak(getattr(torch, dtype))]
    probe_s = [0.0]
    inner = tvlab.reproduce.run_prepared_tasks

    def probed(*args, **kwargs):  # run_main's one call per block of tasks (one task on a CPU), then a probe
        runs = inner(*args, **kwargs)
        t = time.perf_counter()
        probes.append(matmul_peak(getattr(torch, dtype), repeats=3))
        probe_s[0] += time.perf_counter() - t
        return runs

    t0 = time.perf_counter()
    lm = tvlab.load_model(dtype=dtype)
    load_s = time.perf_counter() - t0
    config = tvlab.ExperimentConfig(**config_kwargs)
    tvlab.reproduce.run_prepared_tasks = probed
    try:
        results = tvlab.reproduce.run_main(lm, tasks or tvlab.list_tasks(include_extra=False), config, progress=False)
    finally:
        tvlab.reproduce.run_prepared_tasks = inner
    probes.append(matmul_peak(getattr(torch, dtype)))
    run_s = results.seconds - probe_s[0]
    peak, median = max(probes), statistics.median(probes)
    flops = results.stats.flops(lm)
    means = results.summary[["baseline", "icl", "task_vector"]].mean()
    return {"mode": f"full-{dtype}", "tasks": len(results.summary), "load_s": load_s, "run_s": run_s,
            "tokens": results.stats.tokens, "tokens_per_s": results.stats.tokens / run_s,
            "gflop": flops / 1e9, "gflop_per_s": flops / run_s / 1e9, "peak_gflop_per_s": peak / 1e9,
            "median_peak_gflop_per_s": median / 1e9, "peak_probes_gflop_per_s": [round(p / 1e9, 1) for p in probes],
            "mfu": flops / run_s / peak, "mfu_median_peak": flops / run_s / median, "peak_rss_gb": _peak_rss_gb(),
            "means": {k: round(float(v), 4) for k, v in means.items()}}


def run_plain_vs_fast(tasks: list[str], config_kwargs: dict) -> dict:
    import tvlab

    lm = tvlab.load_model()
    out = {}
    for fast in (True, False):
        config = tvlab.ExperimentConfig(**config_kwargs, fast_path=fast)
        stats = tvlab.ForwardStats()
        t = time.perf_counter()
        frames = [tvlab.run_task(lm, task, config, stats=stats).predictions for task in tasks]
        out["fast" if fast else "plain"] = (time.perf_counter() - t, frames, stats)
    (fast_s, fast_frames, fast_stats), (plain_s, plain_frames, plain_stats) = out["fast"], out["plain"]
    same = total = 0
    for a, b in zip(fast_frames, plain_frames):
        same += int((a["predicted"].values == b["predicted"].values).sum())
        total += len(a)
    return {"mode": "plain-vs-fast", "tasks": tasks, "fast_s": fast_s, "plain_s": plain_s, "speedup": plain_s / fast_s,
            "predictions": total, "identical": same / total,
            "fast_forwards": fast_stats.forwards, "plain_forwards": plain_stats.forwards}


def _child(args) -> None:
    kwargs = json.loads(args.config)
    if args.child == "plain-vs-fast":
        result = run_plain_vs_fast(args.tasks, kwargs)
    else:
        result = run_full(args.child, args.tasks, kwargs)
    print("RESULT " + json.dumps(result))


def _spawn(mode: str, tasks: list[str] | None, config: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--config", json.dumps(config)]
    if tasks:
        cmd += ["--tasks", *tasks]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"benchmark {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 tasks and smaller sets, for a fast check")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)

    subset = ["antonyms", "next_letter", "country_capital"]
    full_tasks = subset if args.quick else None
    full_config = {"n_test": 20, "n_dev": 20, "n_baseline": 40} if args.quick else {}
    compare_config = {"n_test": 8, "n_dev": 8, "n_baseline": 16}
    results = [_spawn("float32", full_tasks, full_config), _spawn("bfloat16", full_tasks, full_config),
               _spawn("plain-vs-fast", subset, compare_config)]

    print(f"\nMachine: {platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for r in results[:2]:
        print(f"{r['mode']:14s} {r['tasks']} tasks: run {r['run_s']:.0f} s (+ load {r['load_s']:.0f} s), "
              f"peak RSS {r['peak_rss_gb']:.2f} GB, {r['tokens_per_s']:.0f} tokens/s, {r['gflop_per_s']:.0f} GFLOP/s "
              f"of {r['peak_gflop_per_s']:.0f} highest measured matmul peak -> MFU {r['mfu']:.0%} "
              f"({r['mfu_median_peak']:.0%} of the median {r['median_peak_gflop_per_s']:.0f} of "
              f"{len(r['peak_probes_gflop_per_s'])} probes); means {r['means']}")
    c = results[2]
    print(f"plain vs fast  {', '.join(c['tasks'])} ({compare_config}): plain {c['plain_s']:.1f} s, fast {c['fast_s']:.1f} s "
          f"-> {c['speedup']:.1f}x faster; {c['identical']:.1%} of {c['predictions']} predictions identical")
    out = HERE / "results" / f"{'quick' if args.quick else 'full'}-{platform.node()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "results": results}, indent=1))
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
