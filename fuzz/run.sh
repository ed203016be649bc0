#!/usr/bin/env bash
# fuzz/run.sh [SECONDS] [TARGET...]: runs each target (default: all) for SECONDS (default 15)
# starting from its committed seeds (fuzz/seeds/TARGET, real PDUs captured from DCMTK and
# pynetdicom). The working corpus and any crash land in fuzz/corpus and fuzz/artifacts (ignored).
# Needs cargo-fuzz; RUSTC_BOOTSTRAP lets it use the nightly flags on a stable toolchain.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-15}; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=($(cargo fuzz list 2>/dev/null || ls fuzz_targets | sed 's/\.rs$//'))
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  cp -n "seeds/$t"/* "corpus/$t/" 2>/dev/null || true
  echo "== fuzz $t for ${secs}s"
  mkdir -p logs
  extra=()
  # assoc_events spends its time on event count, not size: short inputs explore faster.
  [ "$t" = assoc_events ] && extra=(-max_len=2048)
  if ! cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 "${extra[@]}" \
      -print_final_stats=1 >"logs/$t.log" 2>&1; then
    tail -60 "logs/$t.log"
    echo "fuzz target $t FAILED (crash input in fuzz/artifacts/$t)"
    exit 1
  fi
  grep -E "^(#[0-9]+.*(DONE|INITED)|stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb))" "logs/$t.log" || true
done
