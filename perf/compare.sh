#!/usr/bin/env bash
# perf/compare.sh [ASSOCIATIONS] [INSTANCES] [PIXEL_BYTES]: the same load (dicomgate-loadgen) against
# dicomgate (durability fsync, then none), DCMTK storescp and pynetdicom's storescp, each writing
# to a fresh directory on the same disk. One line per receiver. dicomgate runs ingest only (no
# trigger fires), so the numbers compare receivers, not pipelines.
# Note: storescp and pynetdicom never fsync; compare them with dicomgate "none".
set -euo pipefail
cd "$(dirname "$0")/.."
assoc=${1:-4}; n=${2:-500}; px=${3:-512}
cargo build --release -q --bins
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened"; exit 1; }
load() { target/release/dicomgate-loadgen "127.0.0.1:$1" --associations "$assoc" --instances "$n" --pixel-bytes "$px"; }

for durability in fsync none; do
  p=$(port)
  cat > "$work/gate-$durability.toml" <<TOML
[node]
listen = "127.0.0.1:$p"
data_dir = "$work/gate-$durability"
[storage]
durability = "$durability"
[trigger]
on_association_close = false
quiet_seconds = 0
TOML
  target/release/dicomgate serve --config "$work/gate-$durability.toml" >/dev/null 2>"$work/gate.log" &
  pid=$!; wait_port "$p"
  echo -n "dicomgate ($durability): "; load "$p"
  kill $pid; wait $pid 2>/dev/null || true
done

p=$(port); mkdir -p "$work/dcmtk"
TCP_NODELAY=1 /usr/bin/storescp --fork -aet DICOMGATE -od "$work/dcmtk" "$p" >/dev/null 2>&1 &
pid=$!; wait_port "$p"
echo -n "DCMTK storescp: "; load "$p"
pkill -P $pid 2>/dev/null || true; kill $pid; wait $pid 2>/dev/null || true

p=$(port); mkdir -p "$work/pynetdicom"
python3 -m pynetdicom storescp -aet DICOMGATE -od "$work/pynetdicom" "$p" >/dev/null 2>&1 &
pid=$!; wait_port "$p"
echo -n "pynetdicom storescp: "; load "$p"
kill $pid; wait $pid 2>/dev/null || true
