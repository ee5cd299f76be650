"""Peak memory of each notebook in the settings Binder uses, inside a hard memory limit.

mybinder.org restarts a kernel above 2 GB. This runs every notebook (a temporary copy, all
cells, with nbconvert) in its own memory cgroup, the way Binder's container limit counts
memory (the kernel, the notebook runner, and the page cache they use). It reports the peak
working set (anonymous memory plus mapped files such as the model's weights, sampled every
0.1 s), the cgroup's peak including page cache that the kernel may reclaim, how often it hit
the limit, and the wall time. A notebook fits when it finishes under the limit, unkilled.

    sudo python benchmarks/binder_memory.py                       # Binder settings: bfloat16, 1.8 GB
    sudo python benchmarks/binder_memory.py --dtype float32 --limit-gb 8   # for comparison

Needs root and the cgroup-v1 memory controller (/sys/fs/cgroup/memory), as on tvlab's CI
machines. Results go to benchmarks/results/binder-memory-<dtype>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def run_in_cgroup(notebook: Path, limit_bytes: int, env: dict, name: str) -> dict:
    group = CGROUP_V1 / name
    group.mkdir(exist_ok=True)
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        (group / "memory.max_usage_in_bytes").write_text("0")
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / notebook.name
            copy.write_bytes(notebook.read_bytes())
            start = time.perf_counter()
            # The child joins the cgroup before it execs, so the kernel it starts is counted too.
            proc = subprocess.Popen(
                [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                 "--ExecutePreprocessor.timeout=1800", str(copy)],
                env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
            working_set = 0  # anonymous memory + mapped files (the model's weights are a mapped file)
            while proc.poll() is None:
                stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
                working_set = max(working_set, int(stat["total_rss"]) + int(stat["total_mapped_file"]))
                time.sleep(0.1)
            stderr = proc.stderr.read()
            seconds = time.perf_counter() - start
        oom = (group / "memory.oom_control").read_text()
        return {"notebook": notebook.stem, "ok": proc.returncode == 0, "seconds": round(seconds, 1),
                "peak_working_set_gb": round(working_set / 1e9, 3),
                "peak_with_page_cache_gb": round(int((group / "memory.max_usage_in_bytes").read_text()) / 1e9, 3),
                "limit_gb": round(limit_bytes / 1e9, 2),
                "times_at_limit": int((group / "memory.failcnt").read_text()),
                "oom_kills": int(oom.split("oom_kill ")[1].split()[0]) if "oom_kill " in oom else None,
                "error": None if proc.returncode == 0 else stderr[-2000:]}
    finally:
        for pid in (group / "cgroup.procs").read_text().split():  # nothing should be left; never leak
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        group.rmdir()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--limit-gb", type=float, default=1.8)
    ap.add_argument("notebooks", nargs="*", help="names like 02_extracting_task_vectors (default: all)")
    args = ap.parse_args(argv)
    if not (CGROUP_V1 / "memory.limit_in_bytes").exists() or os.geteuid() != 0:
        print("this needs root and the cgroup-v1 memory controller at /sys/fs/cgroup/memory", file=sys.stderr)
        return 2
    paths = [ROOT / "notebooks" / f"{n}.ipynb" for n in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    env = {**os.environ, "TVLAB_DTYPE": args.dtype, "HF_HUB_OFFLINE": "1"}
    rows = []
    for path in paths:
        row = run_in_cgroup(path, int(args.limit_gb * 1e9), env, f"tvlab-binder-{os.getpid()}")
        rows.append(row)
        print(f"{row['notebook']:32s} {'ok' if row['ok'] else 'FAILED':6s} peak {row['peak_working_set_gb']:.2f} GB "
              f"(with page cache {row['peak_with_page_cache_gb']:.2f}) "
              f"(limit {row['limit_gb']} GB, at limit {row['times_at_limit']}x, oom kills {row['oom_kills']}) "
              f"{row['seconds']:.0f} s", flush=True)
        if row["error"]:
            print(row["error"], file=sys.stderr)
    out = ROOT / "benchmarks" / "results" / f"binder-memory-{args.dtype}.json"
    out.write_text(json.dumps({"dtype": args.dtype, "limit_gb": args.limit_gb, "notebooks": rows}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
