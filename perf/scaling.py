#!/usr/bin/env python3
"""perf/scaling.py: dicomgate's ingest rate against its reactor count (issue 5).

For each R in --reactors, starts dicomgate with `reactors = R` and `[storage] workers = R`, and
sends the same load (dicomgate-loadgen, --senders associations, default 8 per reactor of the
largest R) with --runs runs; prints instances/s, server CPU µs per instance and the speed-up
over the first R. Uses perf/compare.py's receiver and measurement code.

  python3 perf/scaling.py --reactors 1,2,4,8 --durability none
  COMPARE_DIR=/mnt/bench python3 perf/scaling.py --reactors 1,2 --workload tiny

On a machine with fewer cores than R plus the generator's threads, the generator and the node
share cores: the curve then shows the machine, not the node (perf/RESULTS.md says which).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reactors", default="1,2")
    ap.add_argument("--workload", default="tiny", choices=list(compare.WORKLOADS))
    ap.add_argument("--durability", default="none", choices=["none", "fsync"])
    ap.add_argument("--senders", type=int, default=0, help="0 = 8 per reactor of the largest R")
    ap.add_argument("--per-sender", type=int, default=0, help="instances per sender (0 = workload's)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--window", type=int, default=1)
    a = ap.parse_args()
    rs = [int(x) for x in a.reactors.split(",")]
    senders = a.senders or 8 * max(rs)
    px, frames, per = compare.WORKLOADS[a.workload]
    per_sender = a.per_sender or per[8]
    compare.WORKLOADS[a.workload] = (px, frames, {senders: per_sender})
    name = "dicomgate-none" if a.durability == "none" else "dicomgate"
    print(f"# perf/scaling.py {' '.join(sys.argv[1:])}")
    print(f"# {os.cpu_count()} CPUs; {senders} senders x {per_sender} {a.workload} instances; "
          f"durability {a.durability}; medians of {a.runs} runs\n")
    print("| reactors (= storage workers) | inst/s | MB/s | server CPU µs/inst | p99 ms | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = None
    for r in rs:
        compare.NODE_EXTRA = {"node": f"reactors = {r}\n", "storage": f"workers = {r}\n"}
        row = compare.run_receiver(name, a.workload, senders, a.runs, a.window, sys.stderr)
        base = base or row["instances_per_s"]
        print(f"| {r} | {row['instances_per_s']:,.0f} | {row['mb_per_s']:,.1f} "
              f"| {row['server_cpu_us']:,.0f} | {row['p99_us'] / 1000:.2f} "
              f"| {row['instances_per_s'] / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
