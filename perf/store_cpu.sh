#!/usr/bin/env bash
# perf/store_cpu.sh [COUNT] [ROWS] [DURABILITY]: starts a release build of the node, sends COUNT
# instances of ROWS x ROWS with DCMTK's storescu (one association, TCP_NODELAY=1), and prints the
# node's CPU time per stored instance (utime+stime from /proc) and the wall-clock rate.
# The sender is DCMTK's own, so this is the check that does not depend on dicomgate-loadgen.
# Data goes under $COMPARE_DIR if set (see perf/RESULTS.md on which file system to use).
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-1000}; rows=${2:-16}; durability=${3:-fsync}
work=$(mktemp -d -p "${COMPARE_DIR:-/tmp}"); trap 'kill $pid 2>/dev/null; rm -rf "$work"' EXIT
cargo build --release -q
python3 perf/make_instances.py "$work/in" "$count" "$rows"
cat >"$work/cfg.toml" <<TOML
[node]
listen = "127.0.0.1:0"
data_dir = "$work/data"
reactors = 1
[storage]
durability = "$durability"
TOML
./target/release/dicomgate serve --config "$work/cfg.toml" >"$work/out" 2>"$work/log" &
pid=$!
for _ in $(seq 50); do grep -q listening "$work/out" 2>/dev/null && break; sleep 0.1; done
port=$(sed -n 's/.*127.0.0.1:\([0-9]*\).*/\1/p' "$work/out")
cpu() { awk '{print $14+$15}' /proc/$pid/stat; }
usr() { awk '{print $14}' /proc/$pid/stat; }
u0=$(usr)
tck=$(getconf CLK_TCK)
c0=$(cpu); t0=$(date +%s.%N)
TCP_NODELAY=1 /usr/bin/storescu -aec DICOMGATE +sd 127.0.0.1 "$port" "$work/in"
t1=$(date +%s.%N); c1=$(cpu); u1=$(usr)
stored=$(find "$work/data" -name '*.dcm' | wc -l)
bytes=$(du -sb "$work/in" | cut -f1)
awk -v n="$stored" -v c="$((c1 - c0))" -v tck="$tck" -v t="$(echo "$t1 - $t0" | bc)" -v b="$bytes" -v r="$rows" -v d="$durability" -v u="$((u1 - u0))" 'BEGIN {
  printf "rows=%d durability=%s stored=%d wall=%.2fs rate=%.0f inst/s %.1f MB/s node_cpu=%.0f us/instance (user %.0f, kernel %.0f)\n",
    r, d, n, t, n / t, b / t / 1e6, c / tck * 1e6 / n, u / tck * 1e6 / n, (c - u) / tck * 1e6 / n }'
