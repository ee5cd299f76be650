"""GPU benchmark: the full 18-task protocol on one GPU, for a 7B-shaped model and the default model.

    python benchmarks/bench_gpu.py               # on a machine with one CUDA GPU (a few minutes)
    python benchmarks/bench_gpu.py --dry-run     # the same code on the CPU, tiny sizes (CI-safe)

The 7B model has LLaMA-7B's real configuration (32 layers, d_model 4096, 11008 MLP, 32
heads, 32k vocabulary) with random bf16 weights: timing needs the shapes, not the training.
Its prompts use tvlab's small word-level tokenizer, so token counts are close to, not equal
to, LLaMA's. For each model: wall time, prompt tokens per second, and MFU against this
GPU's bf16 matmul throughput measured in the same run. The 7B shape runs twice: with the
default blocks of tasks per engine call, and task by task (one task per call), side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reproduce import matmul_peak  # noqa: E402

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}


def random_llama(shape: dict, device: str, dtype: torch.dtype, name: str):
    """A LLaMA-architecture model with random weights, created directly on ``device`` in ``dtype`` (the 7B
    shape's 13.5 GB of bfloat16, never its 27 GB of float32)."""
    import tvlab
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = tvlab.models.tiny_tokenizer()
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return tvlab.LanguageModel(model, tokenizer, name)


def _sync(lm) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def run(lm, config, tasks, peak: float, tasks_per_call: int | None = None) -> dict:
    """The protocol once as a warm-up (one task, small sets), then timed in full.

    ``tasks_per_call``: tasks per engine call (None: the default, ``tvlab.experiments.tasks_per_call``).
    """
    import tvlab

    per_call = tasks_per_call or tvlab.experiments.tasks_per_call(lm, config)
    tvlab.reproduce.run_main(lm, tasks[:1], tvlab.ExperimentConfig(n_test=2, n_dev=2, n_baseline=2), progress=False)
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(lm)
    results = tvlab.reproduce.run_main(lm, tasks, config, progress=False, tasks_per_call=per_call)
    _sync(lm)
    flops = results.stats.flops(lm)
    return {"model": lm.name, "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device),
            "tasks": len(tasks), "seconds": round(results.seconds, 2), "tokens": results.stats.tokens,
            "tokens_per_s": round(results.stats.tokens / results.seconds), "tflop": round(flops / 1e12, 2),
            "mfu": float(f"{flops / results.seconds / peak:.3g}"), "batch_size": results.stats.largest_batch,
            "tasks_per_call": min(per_call, len(tasks)), "forwards": results.stats.forwards,
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if lm.device.type == "cuda" else None,
            "means": results.summary[["baseline", "icl", "task_vector"]].mean().round(3).to_dict()}


def plain_vs_fast(lm, tasks, config) -> dict:
    """The same tasks through the plain per-prompt loop and the fast path: speed ratio, identical predictions."""
    import dataclasses

    import tvlab

    out = {}
    for fast in (True, False):
        cfg = dataclasses.replace(config, fast_path=fast)
        tvlab.run_task(lm, tasks[0], dataclasses.replace(cfg, n_test=1, n_dev=1, n_baseline=1))  # warm-up
        _sync(lm)
        t = time.perf_counter()
        frames = [tvlab.run_task(lm, task, cfg).predictions for task in tasks]
        _sync(lm)
        out[fast] = (time.perf_counter() - t, frames)
    (fast_s, fast_frames), (plain_s, plain_frames) = out[True], out[False]
    same = sum(int((a["predicted"].values == b["predicted"].values).sum()) for a, b in zip(fast_frames, plain_frames))
    total = sum(len(a) for a in fast_frames)
    sets = f"{config.n_dev}/{config.n_test}/{config.n_baseline}"
    return {"model": lm.name, "tasks": list(tasks), "sets": sets, "plain_s": round(plain_s, 2), "fast_s": round(fast_s, 2),
            "speedup": round(plain_s / fast_s, 1), "predictions": total, "identical": round(same / total, 4)}


def table(results: list[dict], peak: float) -> str:
    lines = [f"bf16 matmul peak measured here: {peak / 1e12:.0f} TFLOP/s",
             "| model shape | batch size (auto) | tasks per call | forwards | wall | tokens/s | MFU | peak memory |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        memory = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else "-"
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['tasks_per_call']} | {r['forwards']} | {r['seconds']:.1f} s | "
                     f"{r['tokens_per_s']:,} | {r['mfu']:.1%} | {memory} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    import tvlab

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 tasks, small sets")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --dry-run, or on a GPU machine.")
    device = "cpu" if args.dry_run else "cuda"
    tasks = ["antonyms", "next_letter"] if args.dry_run else tvlab.list_tasks(include_extra=False)
    config = (tvlab.ExperimentConfig(n_test=3, n_dev=3, n_baseline=3) if args.dry_run else tvlab.ExperimentConfig())
    peak = matmul_peak(torch.bfloat16, n=256 if args.dry_run else 8192, device=device)
    results = []
    big = random_llama(TINY if args.dry_run else LLAMA_7B, device, torch.bfloat16,
                       "tiny-llama (dry run)" if args.dry_run else "LLaMA-7B shape (random weights)")
    results.append(run(big, config, tasks, peak))
    results.append(run(big, config, tasks, peak, tasks_per_call=1))  # task by task, as before blocks of tasks
    compare = plain_vs_fast(big, ["antonyms", "next_letter"],
                            tvlab.ExperimentConfig(n_test=2, n_dev=2, n_baseline=2) if args.dry_run
                            else tvlab.ExperimentConfig(n_test=8, n_dev=8, n_baseline=16))
    del big
    if device == "cuda":
        torch.cuda.empty_cache()
    default = tvlab.load_model(None if not args.dry_run else "tiny-gemma3_text", dtype="bfloat16", device=device)
    results.append(run(default, config, tasks, peak))
    print(table(results, peak))
    print(f"plain loop vs fast path on the {compare['model']} ({', '.join(compare['tasks'])}, {compare['sets']} dev/test/baseline sets): "
          f"{compare['plain_s']:.1f} s vs {compare['fast_s']:.2f} s = {compare['speedup']:.0f}x; "
          f"{compare['identical']:.1%} of {compare['predictions']} predictions identical (bfloat16)")
    report = {"date": time.strftime("%Y-%m-%d"), "peak_tflops": round(peak / 1e12, 1),
              "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "results": results, "plain_vs_fast": compare}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
