"""Overhead benchmark on the CPU: the paper's whole protocol on a tiny model, where the work is small.

    python benchmarks/bench_overhead.py                      # this checkout only
    python benchmarks/bench_overhead.py --baseline 28cbad5   # and an older commit, side by side

The model is ``tvlab.load_model("tiny-llama")`` (4 layers, d_model 64, random weights, the
11,050-word tiny tokenizer); the protocol is ``tvlab.reproduce.run_main`` on the paper's 18
tasks with the default ExperimentConfig (50 dev, 50 test, 100 baseline sets), float32. On such
a model most of the time is Python, tokenization, tensor bookkeeping and kernel launches,
which is the cost that bounds the engine on a GPU. Each checkout runs in its own subprocess,
alternating ``--repeats`` times; the best wall time of each is kept. The baseline commit is
checked out with ``git worktree`` into a temporary folder (nothing else changes).

Printed per checkout: best wall time, the time outside the model's forward calls (tokenizer,
pandas, tvlab's own bookkeeping), forward passes, prompt tokens and forward GFLOP
(``ForwardStats.flops``); and the float32 matmul peak measured in the same run, which puts a
floor under the forward calls' time (GFLOP / peak) that no reorganisation of the engine removes.
``--tasks-per-call N`` also runs this checkout with N tasks per engine call (on a CPU
``tvlab reproduce`` runs one; a GPU runs blocks of tasks, see docs/engine.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _measure(**run_kwargs) -> dict:
    """One warm-up (3 tasks), then the full protocol, timing the model's forward calls too."""
    import torch
    import tvlab

    lm = tvlab.load_model("tiny-llama")
    forward_s = [0.0]
    inner = lm.model.forward

    @functools.wraps(inner)  # keeps the signature the engine inspects (which name the cache argument has)
    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            forward_s[0] += time.perf_counter() - t

    lm.model.forward = timed
    tasks = tvlab.list_tasks(include_extra=False)
    config = tvlab.ExperimentConfig()
    tvlab.reproduce.run_main(lm, tasks[:3], config, progress=False, **run_kwargs)
    forward_s[0] = 0.0
    t = time.perf_counter()
    results = tvlab.reproduce.run_main(lm, tasks, config, progress=False, **run_kwargs)
    wall = time.perf_counter() - t
    means = results.summary[["baseline", "icl", "task_vector"]].mean()
    return {"wall_s": wall, "forward_s": forward_s[0], "forwards": results.stats.forwards,
            "tokens": results.stats.tokens, "gflop": results.stats.flops(lm) / 1e9, "threads": torch.get_num_threads(),
            "means": {k: round(float(v), 4) for k, v in means.items()}}


def _run_in(checkout: Path, **run_kwargs) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_overhead as b; "
            f"print('RESULT', json.dumps(b._measure(**{run_kwargs!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the benchmark failed in {checkout}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="a git commit to measure side by side with this checkout")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each checkout, alternating (best kept)")
    parser.add_argument("--tasks-per-call", type=int, help="also run this checkout with this many tasks per engine call")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch
    from bench_reproduce import matmul_peak

    checkouts = {"this checkout": (ROOT, {})}
    if args.tasks_per_call:
        checkouts[f"{args.tasks_per_call} tasks per call"] = (ROOT, {"tasks_per_call": args.tasks_per_call})
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            where = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), args.baseline],
                           check=True)
            checkouts = {f"baseline {args.baseline}": (where, {}), **checkouts}
        try:
            runs: dict[str, list[dict]] = {name: [] for name in checkouts}
            for _ in range(args.repeats):
                for name, (path, run_kwargs) in checkouts.items():
                    runs[name].append(_run_in(path, **run_kwargs))
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False)
    best = {name: min(rs, key=lambda r: r["wall_s"]) for name, rs in runs.items()}
    peak = matmul_peak(torch.float32)
    print(f"tiny-llama, full protocol (18 tasks, 50/50/100 sets), float32, {best['this checkout']['threads']} threads, "
          f"best of {args.repeats}; float32 matmul peak here {peak / 1e9:.0f} GFLOP/s:")
    for name, r in best.items():
        print(f"  {name:22s} {r['wall_s']:6.2f} s, {r['wall_s'] - r['forward_s']:5.2f} s outside forward  "
              f"{r['forwards']:4d} forwards  {r['tokens']:7,d} tokens  {r['gflop']:5.1f} GFLOP  means {r['means']}")
    new = best["this checkout"]
    print(f"  floor of the forward calls at the matmul peak: {new['gflop'] * 1e9 / peak:.2f} s")
    if args.baseline:
        base = best[f"baseline {args.baseline}"]
        print(f"  -> {base['wall_s'] / new['wall_s']:.1f}x less wall time than {args.baseline}; outside the forward "
              f"{(base['wall_s'] - base['forward_s']) / (new['wall_s'] - new['forward_s']):.1f}x less")
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "baseline": args.baseline,
                                              "peak_gflop_per_s": round(peak / 1e9, 1), "runs": runs, "best": best},
                                             indent=1))
    return best


if __name__ == "__main__":
    main()
