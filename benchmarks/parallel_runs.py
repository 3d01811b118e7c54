"""Throughput of N training runs at once on one machine (one GPU, or the CPU cores):
iterations per second summed over the runs, for each N given.

Each run is a ``benchmarks/train_step.py`` process with the options after ``--``; all N
processes of one N do their untimed (compiling) iterations, then wait for a common start
time (``--settle`` seconds after launch) and time the same window, so that their medians
describe the machine shared N ways. A process that was still compiling at the start time
is reported (its window started late).

    python benchmarks/parallel_runs.py --runs 1 2 4 8 -- --device cuda --amp none --compile reduce-overhead
    python benchmarks/parallel_runs.py --runs 1 2 --settle 30 -- --batch-size 16 --amp none --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STEP = Path(__file__).with_name("train_step.py")


def measure(n: int, settle: float, step_args: list[str]) -> dict:
    start_at = time.time() + settle
    cmd = [sys.executable, str(STEP), *step_args, "--start-at", f"{start_at:.3f}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"train_step.py exited with {proc.returncode}:\n{err[-3000:]}")
        results.extend(json.loads(out.strip().splitlines()[-1])["results"])
    per_run = [1000.0 / r["median_ms"] for r in results]
    return {"runs": n, "it_per_s_total": sum(per_run), "it_per_s_each": per_run,
            "late_start_s": max(r.get("late_start_s") or 0.0 for r in results),
            "median_ms": [r["median_ms"] for r in results], "device": results[0]["device"]}


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--settle", type=float, default=180.0,
                   help="seconds from launch to the common timed window (longer than compiling takes)")
    args = p.parse_args(argv[:split])
    step_args = argv[split + 1:]
    if "--amp" not in step_args:  # one mode per process: train_step.py's default times two
        step_args += ["--amp", "none"]
    if bad := [n for n in args.runs if n < 1]:
        p.error(f"--runs {bad}: each must be at least 1")
    print(f"# {os.cpu_count()} CPUs; train_step.py {' '.join(step_args)}")
    rows = []
    for n in args.runs:
        row = measure(n, args.settle, step_args)
        rows.append(row)
        late = f"  (a window started {row['late_start_s']:.0f} s late: raise --settle)" if row["late_start_s"] > 1 else ""
        print(f"N={n}: {row['it_per_s_total']:.2f} it/s in total, {row['it_per_s_total'] / rows[0]['it_per_s_total']:.2f}x "
              f"N=1's, {min(row['it_per_s_each']):.2f}-{max(row['it_per_s_each']):.2f} it/s per run{late}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
