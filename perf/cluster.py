#!/usr/bin/env python3
"""perf/cluster.py: several dicomgate nodes on one PostgreSQL (issue 15's benchmarks).

Everything on one machine: one PostgreSQL (Debian's, initdb into $COMPARE_DIR, fsync on, Unix
socket), N nodes on loopback ports sharing one folder, dicomgate-loadgen as every sender. Per
run, in this order:

  start     N nodes spawned at once: seconds from the spawn until every partition has an
            owner and each node holds its quota (partitions ÷ N, give or take one)
  load      one loadgen per node at once, tiny instances of the same patients at every node
            (what a load balancer does): per node, acknowledged instances/s, rows/s published
            (its rows over the time from the loads' start to its last row in the database),
            node CPU µs per instance, of it the `cluster` thread's (publication) and the
            `owner` thread's (feeding the rows of its partitions into its patient map); the
            database's CPU µs per row
  catch-up  the same load again with the database stopped, then the database started: seconds
            until the first new row, then the backlog's rows/s (every node publishing at once),
            the database's and the `cluster` threads' CPU per row
  join      one more node: seconds from its spawn until it holds its quota of N+1
  kill      kill -9 of that node: seconds until every partition it held has a live owner
            (by design between one and two leases after its last renewal: docs/cluster.md)
  leave     SIGTERM to another node (a clean leave): seconds until it holds no partition

No trigger fires (quiet_seconds is a day, on_association_close off), so what is measured is
ingest, publication and ownership, not processing. Figures are medians over --runs runs, each
on a new database and folder. Times are observed by polling the database every 20 ms (psql:
each poll costs ~10 ms of CPU on this 2-core machine).

  COMPARE_DIR=/mnt/bench python3 perf/cluster.py --nodes 3 --runs 3
  COMPARE_DIR=/mnt/bench python3 perf/cluster.py --nodes 3 --lease-seconds 2 --runs 3 --json out.json
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402


def sql(db, query):
    out = db.run("psql", "-h", db.dir, "-p", str(db.port), "-U", "postgres", "-tAF", "|",
                 "-c", query)
    return [line.split("|") for line in out.strip().splitlines() if line]


def owners(db):
    """{owner or None: partitions}, from the database."""
    try:
        return {o or None: int(n) for o, n in
                sql(db, "SELECT owner, count(*) FROM dicomgate_partitions GROUP BY owner")}
    except subprocess.CalledProcessError:
        return {}  # not migrated yet


def rows_by_node(db):
    try:
        return {n: int(c) for n, c in
                sql(db, "SELECT node_id, count(*) FROM dicomgate_instances GROUP BY node_id")}
    except subprocess.CalledProcessError:
        return {}


def balanced(own, nodes, partitions):
    lo = partitions // len(nodes)
    return (None not in own and sum(own.values()) == partitions
            and all(lo <= own.get(n, 0) <= lo + 1 for n in nodes))


def released(own, node_id):
    """Whether `node_id` owns nothing and every partition has an owner."""
    return own.get(node_id, 0) == 0 and None not in own


def wait_for(what, cond, seconds):
    t0 = time.monotonic()
    while time.monotonic() < t0 + seconds:
        if cond():
            return time.monotonic()
        time.sleep(0.02)
    raise RuntimeError(f"{what}: not within {seconds} s")


class Node:
    def __init__(self, work, db, shared, node_id, partitions, lease):
        self.id, self.port = node_id, compare.free_port()
        cfg = os.path.join(work, f"{node_id}.toml")
        with open(cfg, "w") as f:
            f.write(
                f'[node]\nlisten = "127.0.0.1:{self.port}"\n[http]\nlisten = "127.0.0.1:0"\n'
                '[limits]\nmax_pdu_length = 65536\nmax_associations = 4096\n'
                'max_associations_per_address = 4096\nmax_associations_per_calling_ae = 4096\n'
                '[trigger]\non_association_close = false\nquiet_seconds = 86400\n'
                f'[cluster]\npostgres = "{db.conninfo()}"\nnode_id = "{node_id}"\n'
                f'shared_dir = "{shared}"\npartitions = {partitions}\nlease_seconds = {lease}\n')
        self.log = open(os.path.join(work, f"{node_id}.log"), "w")
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen([compare.NODE, "serve", "--config", cfg], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self):
        compare.wait_port(self.port, self.proc)

    def cpu(self):
        return (compare.tree_cpu_ticks(self.proc.pid) / compare.TCK * 1e9,
                compare.thread_cpu_ns(self.proc.pid, "cluster"),
                compare.thread_cpu_ns(self.proc.pid, "owner"))

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def load_all(a, nodes):
    """One loadgen per node, all at once; their JSON results, in the nodes' order."""
    gens = [subprocess.Popen(
        [compare.LOADGEN, f"127.0.0.1:{n.port}", "--associations", str(a.associations),
         "--instances", str(a.instances), "--patients", str(a.patients),
         "--pixel-bytes", "512", "--max-pdu", "65536", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in nodes]
    outs = [g.communicate(timeout=900) for g in gens]
    for g, (_, err) in zip(gens, outs):
        if g.returncode != 0:
            raise RuntimeError(f"loadgen failed: {err.strip()[-500:]}")
    return [json.loads(out) for out, _ in outs]


def one_run(a, log):
    work = tempfile.mkdtemp(prefix="cluster-bench-", dir=os.environ.get("COMPARE_DIR"))
    db, nodes = None, []
    try:
        db = compare.ClusterDb(work)
        shared = os.path.join(work, "shared")
        os.makedirs(shared)
        r = {}
        ids = [f"n{i}" for i in range(a.nodes)]
        for node_id in ids:
            nodes.append(Node(work, db, shared, node_id, a.partitions, a.lease_seconds))
        t0 = nodes[0].spawned
        for n in nodes:
            n.ready()
        t = wait_for("start", lambda: balanced(owners(db), ids, a.partitions), 60)
        r["start_s"] = t - t0

        # Load: one loadgen per node, at once.
        cpu0 = {n.id: n.cpu() for n in nodes}
        d0 = compare.tree_cpu_ticks(db.postmaster())
        t_load = time.monotonic()
        loads = load_all(a, nodes)
        t_end = time.monotonic()
        d1 = compare.tree_cpu_ticks(db.postmaster())
        want = {n.id: l["instances"] for n, l in zip(nodes, loads)}
        last = {}
        deadline = t_end + 120
        while len(last) < len(nodes) and time.monotonic() < deadline:
            have = rows_by_node(db)
            for k, v in want.items():
                if k not in last and have.get(k, 0) >= v:
                    last[k] = time.monotonic()
            time.sleep(0.02)
        if len(last) < len(nodes):
            raise RuntimeError(f"rows not all published in 120 s: {rows_by_node(db)} of {want}")
        # A second for the owners' feeds to read the last rows (their CPU is counted, not
        # when each row reached a map).
        time.sleep(1.0)
        cpu1 = {n.id: n.cpu() for n in nodes}
        total = sum(want.values())
        r["nodes"] = []
        for n, l in zip(nodes, loads):
            c0, c1, k = cpu0[n.id], cpu1[n.id], max(want[n.id], 1)
            r["nodes"].append({
                "node": n.id,
                "instances": want[n.id],
                "instances_per_s": l["instances_per_s"],
                "published_rows_per_s": want[n.id] / (last[n.id] - t_load),
                "published_after_s": last[n.id] - t_end,
                "node_cpu_us": (c1[0] - c0[0]) / 1e3 / k,
                "cluster_cpu_us": (c1[1] - c0[1]) / 1e3 / k,
                # The owner feeds every node's rows of its partitions: per row fed, about
                # total / nodes rows each.
                "owner_cpu_us_per_row": (c1[2] - c0[2]) / 1e3 / max(total / len(nodes), 1),
            })
        r["rows"] = total
        r["rows_per_s"] = total / (max(last.values()) - t_load)
        r["db_cpu_us_per_row"] = (d1 - d0) / compare.TCK * 1e6 / max(total, 1)

        # Catch-up: the same load again with the database stopped (the nodes acknowledge
        # locally and queue), then the database started: the backlog's publication by every
        # node at once, from the first new row seen to the last.
        base, n_before = rows_by_node(db), total
        db.stop_fast()
        backlog = {n.id: base.get(n.id, 0) + l["instances"]
                   for n, l in zip(nodes, load_all(a, nodes))}
        cpu0 = {n.id: n.cpu() for n in nodes}
        db.start()
        t_db = time.monotonic()
        d0 = compare.tree_cpu_ticks(db.postmaster())
        first, done = None, {}
        while len(done) < len(nodes) and time.monotonic() < t_db + 120:
            have = rows_by_node(db)
            now = time.monotonic()
            if first is None and sum(have.values()) > n_before:
                first = (now, sum(have.values()))
            for k, v in backlog.items():
                if k not in done and have.get(k, 0) >= v:
                    done[k] = now
            time.sleep(0.02)
        if len(done) < len(nodes):
            raise RuntimeError(f"backlog not published in 120 s: {rows_by_node(db)} of {backlog}")
        d1 = compare.tree_cpu_ticks(db.postmaster())
        cpu1 = {n.id: n.cpu() for n in nodes}
        want_all = sum(backlog.values())
        r["catch_up_first_s"] = first[0] - t_db
        r["catch_up_rows"] = want_all - n_before
        r["catch_up_rows_per_s"] = (want_all - first[1]) / max(max(done.values()) - first[0], 1e-3)
        r["catch_up_db_cpu_us_per_row"] = (d1 - d0) / compare.TCK * 1e6 / max(want_all - n_before, 1)
        r["catch_up_cluster_cpu_us_per_row"] = statistics.mean(
            (cpu1[n.id][1] - cpu0[n.id][1]) / 1e3 / max(backlog[n.id] - base.get(n.id, 0), 1)
            for n in nodes)

        # Join, then kill -9 of the joined node, then a clean leave of another.
        ids.append(f"n{a.nodes}")
        nodes.append(Node(work, db, shared, ids[-1], a.partitions, a.lease_seconds))
        joined = nodes[-1]
        joined.ready()
        t = wait_for("join", lambda: balanced(owners(db), ids, a.partitions), 120)
        r["join_s"] = t - joined.spawned
        t = time.monotonic()
        joined.stop(signal.SIGKILL)
        ids.pop()
        t = wait_for("kill", lambda: released(owners(db), joined.id),
                     10 * a.lease_seconds + 30) - t
        r["kill_s"] = t
        leaver = nodes[1]
        t = time.monotonic()
        os.killpg(leaver.proc.pid, signal.SIGTERM)
        t = wait_for("leave", lambda: released(owners(db), leaver.id), 60) - t
        r["leave_s"] = t
        print(f"  start {r['start_s']:.2f} s, {r['rows']} rows at {r['rows_per_s']:,.0f} rows/s "
              f"(database {r['db_cpu_us_per_row']:.0f} µs/row), backlog of {r['catch_up_rows']} at "
              f"{r['catch_up_rows_per_s']:,.0f} rows/s, join {r['join_s']:.2f} s, "
              f"kill -9 {r['kill_s']:.2f} s, leave {r['leave_s']:.2f} s", file=log, flush=True)
        return r
    finally:
        for n in nodes:
            try:
                n.stop()
            except OSError:
                pass
        if db:
            db.stop()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=256)
    ap.add_argument("--lease-seconds", type=int, default=10)
    ap.add_argument("--associations", type=int, default=4, help="per node")
    ap.add_argument("--instances", type=int, default=2500, help="per association")
    ap.add_argument("--patients", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "--bins"], cwd=compare.ROOT,
                       check=True)
    print(f"# perf/cluster.py {' '.join(sys.argv[1:])}")
    print(f"# {os.cpu_count()} CPUs; {a.nodes} nodes + 1 joining, {a.partitions} partitions, "
          f"lease_seconds {a.lease_seconds}; per node {a.associations} associations × "
          f"{a.instances} tiny instances of {a.patients} patients; medians of {a.runs} runs\n",
          flush=True)
    runs = [one_run(a, sys.stderr) for _ in range(a.runs)]
    med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
    print("| measure (medians) | value |\n|---|---:|")
    print(f"| {a.nodes} nodes started at once: all partitions owned, shares even | "
          f"{med(lambda r: r['start_s']):.2f} s |")
    print(f"| rows published, all nodes | {med(lambda r: r['rows_per_s']):,.0f} rows/s |")
    print(f"| database CPU per row | {med(lambda r: r['db_cpu_us_per_row']):.0f} µs |")
    for i in range(a.nodes):
        g = lambda k: med(lambda r: r["nodes"][i][k])  # noqa: E731
        print(f"| node n{i}: acknowledged / published | {g('instances_per_s'):,.0f} / "
              f"{g('published_rows_per_s'):,.0f} per s (last row {g('published_after_s'):.2f} s "
              f"after its load) |")
        print(f"| node n{i}: CPU per instance (of it `cluster`); `owner` per row fed | "
              f"{g('node_cpu_us'):.0f} ({g('cluster_cpu_us'):.1f}) µs; {g('owner_cpu_us_per_row'):.1f} µs |")
    print(f"| database stopped during a second load, then started: first rows after | "
          f"{med(lambda r: r['catch_up_first_s']):.2f} s |")
    print(f"| then the backlog ({med(lambda r: r['catch_up_rows']):,.0f} rows, every node at once) | "
          f"{med(lambda r: r['catch_up_rows_per_s']):,.0f} rows/s |")
    print(f"| backlog: database CPU per row; each node's `cluster` thread per row | "
          f"{med(lambda r: r['catch_up_db_cpu_us_per_row']):.0f} µs; "
          f"{med(lambda r: r['catch_up_cluster_cpu_us_per_row']):.1f} µs |")
    print(f"| a node joins: holds its share after its spawn | {med(lambda r: r['join_s']):.2f} s |")
    print(f"| kill -9 of a node: its partitions owned by live nodes | "
          f"{med(lambda r: r['kill_s']):.2f} s (lease {a.lease_seconds} s) |")
    print(f"| clean leave (SIGTERM): its partitions owned by others | "
          f"{med(lambda r: r['leave_s']):.2f} s |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
