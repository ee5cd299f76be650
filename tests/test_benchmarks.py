"""The benchmark scripts run (the GPU one as a CPU dry run, so CI needs no GPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_gpu  # noqa: E402
import bench_reproduce  # noqa: E402
import torch  # noqa: E402


def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
    results = bench_gpu.main(["--dry-run", "--out", str(tmp_path / "gpu.json")])
    assert [r["tasks"] for r in results] == [2, 2]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in results)
    assert (tmp_path / "gpu.json").exists()


def test_matmul_peak_is_positive():
    assert bench_reproduce.matmul_peak(torch.float32, n=128, repeats=2) > 0
