"""A layer sweep with and without skipping the blocks before each row's patch (docs/engine.md, rule 9).

    python benchmarks/bench_sweep.py                         # antonyms on the bundled model, float32
    python benchmarks/bench_sweep.py --task fr_en --repeats 6

Runs one task of the paper's protocol (``tvlab.run_task``) once to record its three engine calls,
then replays the second, the layer sweep (every dev query patched with its own set's θ at every
layer), ``--repeats`` times with the skip and without it, alternating, in this one process. Prints
the best and median seconds of each, forward passes, the share of the rows' block work left out,
forward GFLOP (``ForwardStats.flops``: without the skip the blocks all count) and whether every
prediction is the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tvlab
from tvlab import engine, experiments


def _sweep_call(lm, task: str):
    """The positional and keyword arguments of ``run_task``'s layer-sweep call of ``predict_last``."""
    calls = []
    inner = experiments.predict_last

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return inner(*args, **kwargs)

    experiments.predict_last = record
    try:
        tvlab.run_task(lm, task)
    finally:
        experiments.predict_last = inner
    return calls[1]


def _run(lm, args, kwargs, skip: bool):
    row_skip = engine._row_skip
    if not skip:
        engine._row_skip = lambda patch, suffix_len: 0
    stats = tvlab.ForwardStats()
    try:
        t = time.perf_counter()
        out = engine.predict_last(*args, **{**kwargs, "stats": stats})
        seconds = time.perf_counter() - t
    finally:
        engine._row_skip = row_skip
    return seconds, out.top_ids, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="antonyms")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    opts = parser.parse_args()
    lm = tvlab.load_model(dtype=opts.dtype)
    args, kwargs = _sweep_call(lm, opts.task)
    times = {True: [], False: []}
    same, stats = True, {}
    for _ in range(opts.repeats):
        tops = {}
        for skip in (False, True):
            seconds, tops[skip], stats[skip] = _run(lm, args, kwargs, skip)
            times[skip].append(seconds)
        same &= torch.equal(tops[True], tops[False])
    rows = len(args[1])
    result = {"task": opts.task, "dtype": opts.dtype, "rows": rows, "threads": torch.get_num_threads(),
              "identical_predictions": bool(same)}
    for skip, name in ((False, "all_blocks"), (True, "skipping")):
        s = stats[skip]
        result[name] = {"best_s": round(min(times[skip]), 3), "median_s": round(statistics.median(times[skip]), 3),
                        "forwards": s.forwards, "gflop": round(s.flops(lm) / 1e9, 1),
                        "rows_block_work_left_out": round(s.skipped / (rows * lm.n_layers), 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
