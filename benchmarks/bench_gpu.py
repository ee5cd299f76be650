"""GPU benchmark: the full 18-task protocol on one GPU, for a 7B-shaped model and the default model.

    python benchmarks/bench_gpu.py               # on a machine with one CUDA GPU (a few minutes)
    python benchmarks/bench_gpu.py --dry-run     # the same code on the CPU, tiny sizes (CI-safe)

The 7B model has LLaMA-7B's real configuration (32 layers, d_model 4096, 11008 MLP, 32
heads, 32k vocabulary) with random bf16 weights: timing needs the shapes, not the training.
Its prompts use tvlab's small word-level tokenizer, so token counts are close to, not equal
to, LLaMA's. For each model: wall time, prompt tokens per second, and MFU against this
GPU's bf16 matmul throughput measured in the same run.
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
    """A LLaMA-architecture model with random weights, created directly on ``device``."""
    import tvlab
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tvlab.models.tiny_tokenizer()
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return tvlab.LanguageModel(model, tokenizer, name)


def run(lm, config, tasks, peak: float) -> dict:
    import tvlab

    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    sync()
    results = tvlab.reproduce.run_main(lm, tasks, config, progress=False)
    sync()
    flops = results.stats.flops(lm)
    return {"model": lm.name, "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device),
            "tasks": len(tasks), "seconds": round(results.seconds, 1), "tokens": results.stats.tokens,
            "tokens_per_s": round(results.stats.tokens / results.seconds), "tflop": round(flops / 1e12, 2),
            "mfu": float(f"{flops / results.seconds / peak:.3g}"),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if lm.device.type == "cuda" else None,
            "means": results.summary[["baseline", "icl", "task_vector"]].mean().round(3).to_dict()}


def main(argv=None) -> list[dict]:
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
                       "tiny-llama (dry run)" if args.dry_run else "llama-7b-config (random weights)")
    results.append(run(big, config, tasks, peak))
    del big
    if device == "cuda":
        torch.cuda.empty_cache()
    default = tvlab.load_model(None if not args.dry_run else "tiny-gemma3_text", dtype="bfloat16", device=device)
    results.append(run(default, config, tasks, peak))
    print(f"bf16 matmul peak on {device}: {peak / 1e12:.1f} TFLOP/s")
    for r in results:
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "peak_tflops": peak / 1e12,
                                              "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                              "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
