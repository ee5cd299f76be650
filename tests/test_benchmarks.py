"""The benchmark scripts run (the GPU one as a CPU dry run, so CI needs no GPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_gpu  # noqa: E402
import bench_reproduce  # noqa: E402
import torch  # noqa: E402


def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
    report = bench_gpu.main(["--dry-run", "--out", str(tmp_path / "gpu.json")])
    results = report["results"]
    assert [r["tasks"] for r in results] == [2, 2, 2] and [r["tasks_per_call"] for r in results] == [1, 1, 1]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] and 1 <= r["batch_size"] <= 256 for r in results)
    compare = report["plain_vs_fast"]
    assert compare["speedup"] > 0 and 0.5 <= compare["identical"] <= 1 and compare["predictions"] > 0
    assert f"| tiny-llama (dry run) | {results[0]['batch_size']} | 1 |" in bench_gpu.table(results, report["peak_tflops"] * 1e12)
    assert (tmp_path / "gpu.json").exists()


def test_overhead_benchmark_measures_the_tiny_model(monkeypatch, capsys):
    import bench_overhead

    calls = []

    def fake_run(path, **run_kwargs):
        calls.append(run_kwargs)
        return {**FAKE, "wall_s": 2.0 if path != bench_overhead.ROOT else 0.5}

    monkeypatch.setattr(bench_overhead, "_run_in", fake_run)
    monkeypatch.setattr(bench_reproduce, "matmul_peak", lambda dtype: 100e9)
    best = bench_overhead.main(["--repeats", "1", "--tasks-per-call", "18"])
    assert set(best) == {"this checkout", "18 tasks per call"} and best["this checkout"]["wall_s"] == 0.5
    assert calls == [{}, {"tasks_per_call": 18}]
    out = capsys.readouterr().out
    assert "0.25 s outside forward" in out and "floor of the forward calls at the matmul peak: 0.45 s" in out


def test_matmul_peak_is_positive():
    assert bench_reproduce.matmul_peak(torch.float32, n=128, repeats=2) > 0


FAKE = {"forward_s": 0.25, "forwards": 108, "tokens": 98985, "gflop": 44.6, "threads": 2, "means": {}}


def test_overhead_measurement_runs_the_protocol(monkeypatch):
    """The measurement itself, on fewer tasks (the benchmark runs all 18)."""
    import bench_overhead
    import tvlab

    monkeypatch.setattr(tvlab, "list_tasks", lambda include_extra=False: ["antonyms", "next_letter", "country_capital", "to_upper"])
    monkeypatch.setattr(tvlab, "ExperimentConfig", lambda: tvlab.experiments.ExperimentConfig(n_test=2, n_dev=2, n_baseline=2))
    result = bench_overhead._measure()
    together = bench_overhead._measure(tasks_per_call=4)
    assert together["means"] == result["means"] and together["forwards"] < result["forwards"]
    assert result["forwards"] > 0 and result["tokens"] > 0 and 0 < result["forward_s"] < result["wall_s"]


def test_full_run_probes_the_peak_between_tasks_and_divides_by_the_highest(monkeypatch):
    import tvlab

    tiny = tvlab.load_model("tiny-llama")
    monkeypatch.setattr(tvlab, "load_model", lambda dtype=None: tiny)
    readings = iter([90e9, 120e9, 60e9, 100e9])  # before, after each of the 2 tasks, after the run
    monkeypatch.setattr(bench_reproduce, "matmul_peak", lambda dtype, repeats=6: next(readings))
    inner = tvlab.reproduce.run_prepared_tasks
    r = bench_reproduce.run_full("float32", ["antonyms", "next_letter"], {"n_test": 2, "n_dev": 2, "n_baseline": 2})
    assert tvlab.reproduce.run_prepared_tasks is inner  # the probe is taken off again
    assert r["tasks"] == 2 and r["peak_probes_gflop_per_s"] == [90.0, 120.0, 60.0, 100.0]
    assert r["peak_gflop_per_s"] == 120.0 and r["median_peak_gflop_per_s"] == 95.0
    assert 0 < r["mfu"] < r["mfu_median_peak"] and abs(r["mfu"] * 120 / (r["mfu_median_peak"] * 95) - 1) < 1e-9
