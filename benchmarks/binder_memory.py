"""Peak memory of each notebook in the settings Binder uses, inside a hard memory limit.

mybinder.org restarts a kernel above 2 GB. This runs every notebook (a temporary copy, all
cells, with nbconvert) in its own memory cgroup, the way Binder's container limit counts
memory (the kernel, the notebook runner, and the page cache they use). It reports the peak
working set (anonymous memory plus mapped files such as the model's weights, sampled every
0.1 s), the cgroup's peak including page cache that the kernel may reclaim, how often it hit
the limit, and the wall time. A notebook fits when it finishes under the limit, unkilled.

    sudo python benchmarks/binder_memory.py                  # Binder's settings (binder/start), 1.8 GB
    sudo python benchmarks/binder_memory.py --emulate-avx2   # ... on an AVX2-only node: auto -> float32 products
    sudo python benchmarks/binder_memory.py --emulate-avx2 --weights-dtype same 03_layer_sweep  # float32 weights too

``--emulate-avx2`` caps torch's CPU kernels at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2),
as on a CPU without native bfloat16: bfloat16 matrix products then run 40-400x slower than float32,
and ``auto`` picks float32. Binder's settings are TVLAB_DTYPE=auto and TVLAB_WEIGHTS_DTYPE=bfloat16
(weights stored in bfloat16 whatever the products are computed in). Needs root and the cgroup-v1 memory controller (/sys/fs/cgroup/memory), as
on tvlab's CI machines. Results go to
benchmarks/results/binder-memory-<dtype auto resolved to>[-<weights dtype>-weights][-avx2][-limit-<N>gb].json;
naming notebooks updates their rows in that file and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CPUACCT_V1 = Path("/sys/fs/cgroup/cpuacct")  # CPU time of the notebook's processes, when the controller is there
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}

_PROBE = """
import json, os, time, torch
from tvlab import models
t = time.perf_counter()
dtype = models._resolve_dtype(os.environ["TVLAB_DTYPE"], torch.device("cpu"))
decided_s = time.perf_counter() - t
weights = models._resolve_weights_dtype(None, dtype)
rates = {}
for name in ("float32", "bfloat16"):
    a, b = (torch.randn(1024, 1024).to(getattr(torch, name)) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
    rates[name] = round(2 * 1024**3 / best / 1e9, 2)
print(json.dumps({"dtype": str(dtype).removeprefix("torch."), "weights_dtype": str(weights).removeprefix("torch."),
                  "decided_s": round(decided_s, 3),
                  "matmul_1024_gflop_per_s": rates, "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
"""


def probe(env: dict) -> dict:
    """The dtype TVLAB_DTYPE resolves to under ``env``, and the matmul rates there."""
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def evict_model_cache(env: dict) -> None:
    """Drop tvlab's cached model files from the page cache.

    cgroup v1 charges a page of a file to the group that first read it. Pages still cached from an
    earlier run (e.g. outside any group) would be mapped by the notebook uncharged: its weights would
    count for nothing against the limit. A fresh Binder container reads them itself, so evict them.
    Pages that another running process maps stay; ``peak_rss_gb`` counts them anyway.
    """
    from tvlab.models import cache_root

    root = Path(env["TVLAB_CACHE"]).expanduser() if env.get("TVLAB_CACHE") else cache_root()
    for path in (root / "models").glob("*/*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _rss(pids: list[str]) -> int:
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("VmRSS:")), 0)
    return total


def run_in_cgroup(notebook: Path, limit_bytes: int, env: dict, name: str) -> dict:
    group = CGROUP_V1 / name
    group.mkdir(exist_ok=True)
    cpu_group = CPUACCT_V1 / name if (CPUACCT_V1 / "cpuacct.usage").exists() else None
    if cpu_group is not None:
        cpu_group.mkdir(exist_ok=True)

    def join() -> None:
        for g in (group, cpu_group):
            if g is not None:
                (g / "cgroup.procs").write_text(str(os.getpid()))

    evict_model_cache(env)
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        (group / "memory.max_usage_in_bytes").write_text("0")
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / notebook.name
            copy.write_bytes(notebook.read_bytes())
            start = time.perf_counter()
            load_before = os.getloadavg()[0]
            # The child joins the cgroup before it execs, so the kernel it starts is counted too.
            proc = subprocess.Popen(
                [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                 "--ExecutePreprocessor.timeout=1800", str(copy)],
                env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                preexec_fn=join)
            working_set = 0  # anonymous memory + mapped files (the model's weights are a mapped file)
            rss = 0  # the processes' own count (VmRSS), whichever group their file pages are charged to
            while proc.poll() is None:
                stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
                working_set = max(working_set, int(stat["total_rss"]) + int(stat["total_mapped_file"]))
                rss = max(rss, _rss((group / "cgroup.procs").read_text().split()))
                time.sleep(0.1)
            stderr = proc.stderr.read()
            seconds = time.perf_counter() - start
        oom = (group / "memory.oom_control").read_text()
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
        return {"notebook": notebook.stem, "ok": proc.returncode == 0, "seconds": round(seconds, 1),
                # CPU time of all its processes: less sensitive than wall time to others' work on a shared machine
                "cpu_seconds": None if cpu_group is None else round(int((cpu_group / "cpuacct.usage").read_text()) / 1e9, 1),
                "peak_working_set_gb": round(working_set / 1e9, 3),
                "peak_rss_gb": round(rss / 1e9, 3),
                "peak_with_page_cache_gb": round(int((group / "memory.max_usage_in_bytes").read_text()) / 1e9, 3),
                "limit_gb": round(limit_bytes / 1e9, 2),
                "times_at_limit": int((group / "memory.failcnt").read_text()),
                "oom_kills": int(oom.split("oom_kill ")[1].split()[0]) if "oom_kill " in oom else None,
                # pages read back from disk: many mean the limit made the kernel drop the weights and re-read them
                "major_page_faults": int(stat.get("total_pgmajfault", 0)),
                # run times mean little on a machine others use: the 1-minute load average before and after
                "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                "error": None if proc.returncode == 0 else stderr[-2000:]}
    finally:
        for pid in (group / "cgroup.procs").read_text().split():  # nothing should be left; never leak
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        group.rmdir()
        if cpu_group is not None:
            cpu_group.rmdir()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                    help="TVLAB_DTYPE for the notebooks (default auto, as binder/start sets)")
    ap.add_argument("--weights-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "same"],
                    help="TVLAB_WEIGHTS_DTYPE (default bfloat16, as binder/start sets; same: as the products)")
    ap.add_argument("--emulate-avx2", action="store_true", help="cap torch's CPU kernels at AVX2 (no native bfloat16)")
    ap.add_argument("--limit-gb", type=float, default=1.8)
    ap.add_argument("notebooks", nargs="*", help="names like 02_extracting_task_vectors (default: all)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: still kill the notebook and remove the groups
    if not (CGROUP_V1 / "memory.limit_in_bytes").exists() or os.geteuid() != 0:
        print("this needs root and the cgroup-v1 memory controller at /sys/fs/cgroup/memory", file=sys.stderr)
        return 2
    paths = [ROOT / "notebooks" / f"{n}.ipynb" for n in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    env = {**os.environ, "TVLAB_DTYPE": args.dtype, "HF_HUB_OFFLINE": "1"}
    for key in (*AVX2_ONLY, "TVLAB_WEIGHTS_DTYPE"):
        env.pop(key, None)
    if args.weights_dtype != "same":
        env["TVLAB_WEIGHTS_DTYPE"] = args.weights_dtype
    if args.emulate_avx2:
        env.update(AVX2_ONLY)
    cpu = probe(env)
    print(f"TVLAB_DTYPE={args.dtype} -> {cpu['dtype']} (decided in {cpu['decided_s']} s), weights stored in "
          f"{cpu['weights_dtype']}; torch CPU capability "
          f"{cpu['cpu_capability']}, 1024x1024 matmul GFLOP/s {cpu['matmul_1024_gflop_per_s']}; CPU flags {cpu_flags()}",
          flush=True)
    weights = "" if cpu["weights_dtype"] == cpu["dtype"] else f"-{cpu['weights_dtype']}-weights"
    limit = "" if args.limit_gb == 1.8 else f"-limit-{args.limit_gb:g}gb"
    out = (ROOT / "benchmarks" / "results"
           / f"binder-memory-{cpu['dtype']}{weights}{'-avx2' if args.emulate_avx2 else ''}{limit}.json")
    settings = {"dtype": cpu["dtype"], "weights_dtype": cpu["weights_dtype"], "TVLAB_DTYPE": args.dtype,
                "TVLAB_WEIGHTS_DTYPE": env.get("TVLAB_WEIGHTS_DTYPE"), "limit_gb": args.limit_gb,
                "emulated": AVX2_ONLY if args.emulate_avx2 else None}
    earlier = []
    if args.notebooks and out.exists():  # a partial run updates its rows of an earlier run in the same settings
        previous = json.loads(out.read_text())
        if all(previous.get(k) == v for k, v in settings.items()):
            earlier = previous["notebooks"]
    rows = []
    for path in paths:
        row = run_in_cgroup(path, int(args.limit_gb * 1e9), env, f"tvlab-binder-{os.getpid()}")
        rows.append(row)
        print(f"{row['notebook']:32s} {'ok' if row['ok'] else 'FAILED':6s} peak {row['peak_working_set_gb']:.2f} GB "
              f"(RSS {row['peak_rss_gb']:.2f}, with page cache {row['peak_with_page_cache_gb']:.2f}, "
              f"major faults {row['major_page_faults']}) "
              f"(limit {row['limit_gb']} GB, at limit {row['times_at_limit']}x, oom kills {row['oom_kills']}) "
              f"{row['seconds']:.0f} s, CPU {row['cpu_seconds']} s (load {row['load_average'][0]}-{row['load_average'][1]})",
              flush=True)
        if row["error"]:
            print(row["error"], file=sys.stderr)
        names = {r["notebook"] for r in rows}  # written after every notebook: a stopped run keeps what it measured
        table = sorted([r for r in earlier if r["notebook"] not in names] + rows, key=lambda r: r["notebook"])
        out.write_text(json.dumps({**settings, "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
                                   "cpu_flags": cpu_flags(), "cpu": cpu, "notebooks": table}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
