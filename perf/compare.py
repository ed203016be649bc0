#!/usr/bin/env python3
"""perf/compare.py: the same C-STORE load against several Storage SCPs on loopback, one table.

Sender: target/release/dicomgate-loadgen (same binary, same data sets, same max PDU 65536 for
every receiver). Receivers, each writing to a fresh folder on the same disk:

  dicomgate        release build, durability = "fsync" (default: acknowledged = durable)
  dicomgate-none   release build, durability = "none" (no flush, like the others)
  dicomgate-syncfs release build, durability = "syncfs" (not in the default list)
  dicomgate-files  release build, fsync, inline_max_bytes = 0: every instance its own file, no
                   segment log (the storage path before issue 10; not in the default list)
  dicomgate-inline-N  release build, fsync, inline_max_bytes = N (not in the default list):
                   where the segment log should stop, e.g. --workloads mr,ct,cr
                   --receivers dicomgate-inline-65536,dicomgate-inline-262144,dicomgate
  dcmtk            /usr/bin/storescp --fork (Debian dcmtk), TCP_NODELAY=1
  dicom-rs         dicom-storescp -n (cargo install dicom-storescp)
  pynetdicom       python3 -m pynetdicom storescp
  orthanc          /usr/sbin/Orthanc (Debian), TCP_NODELAY=1, default SyncStorageArea
  dicomgate-cluster  release build, fsync, with [cluster]: a PostgreSQL of its own (Debian's,
                   initdb into the receiver's folder on the same disk, fsync on), the node
                   publishing every record it acknowledges (issue 15; not in the default list).
                   Also reported: the database's CPU per instance, and how long after the last
                   acknowledgement every row was in the database

Per run: instances/s and MB/s (loadgen), server CPU µs per instance (utime+stime of the
receiver's whole process tree from /proc, reaped children included), C-STORE latency p50/p99.
Peak RSS: the largest sum of VmRSS over the receiver's process tree, sampled every 50 ms, or
the main process's VmHWM if larger (shared pages of forked children count once per child). Each
cell is the median of --runs runs against one receiver process; ratios are to dicomgate (fsync).
The receivers of a cell take turns (all started first, run i begins with receiver i mod n), so
a machine that drifts during the cell weighs on all of them alike; --no-interleave runs each
receiver's runs back to back instead. The header gives the disk probe and a memory probe (the
cost of a first write to a free page: perf/RESULTS.md, "this VM's memory").
Not counted anywhere: kernel threads (jbd2 journal commits, writeback workers) that flush pages
on the receivers' behalf.

Where the folders go: $COMPARE_DIR (default: the system's temporary folder). Use a journaled
file system made for the purpose (perf/RESULTS.md shows how): on an ext4 without a journal, as
this VM's root is, the inode allocator skips and re-reads every inode freed in the last 60-360 s,
so whoever creates files after a receiver's files were deleted pays for the deletion.

  python3 perf/compare.py                      # every workload, 1 and 8 senders, 5 runs
  python3 perf/compare.py --workloads tiny --senders 1 --receivers dicomgate,dcmtk --runs 3
  python3 perf/compare.py --json results.json  # also keep every run's figures

Publication to a cluster database (issue 15): the node with and without [cluster], and the
catch-up of a backlog after the database was down during the load (40,000 instances):

  python3 perf/compare.py --workloads tiny-many --senders 8 --receivers dicomgate,dicomgate-cluster
  python3 perf/compare.py --cluster-catch-up --workloads tiny-many --senders 8 --receivers dicomgate-cluster

A/B of two builds in one run: receiver `dicomgate-b` is the dicomgate binary named by
$COMPARE_DICOMGATE_B (another commit's release build), configured as `dicomgate` (fsync):

  COMPARE_DICOMGATE_B=/tmp/old/dicomgate python3 perf/compare.py --receivers dicomgate,dicomgate-b
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN = os.path.join(ROOT, "target", "release", "dicomgate-loadgen")
NODE = os.path.join(ROOT, "target", "release", "dicomgate")
MAX_PDU = 65536
TCK = os.sysconf("SC_CLK_TCK")

# name: (pixel bytes, frames, {senders: instances per sender})
WORKLOADS = {
    "tiny": (16 * 16 * 2, 1, {1: 1000, 8: 250}),
    "mr": (256 * 256 * 2, 1, {1: 500, 8: 125}),
    "ct": (512 * 512 * 2, 1, {1: 200, 8: 50}),
    "cr": (1024 * 1024 * 2, 1, {1: 60, 8: 15}),
    "large": (512 * 512 * 2 * 100, 100, {1: 6, 8: 2}),
    # 40,000 tiny instances over 8 senders: a backlog for --cluster-catch-up to time.
    "tiny-many": (16 * 16 * 2, 1, {1: 20000, 8: 5000}),
}
# Extra lines for dicomgate's [node] and [storage] sections (perf/scaling.py sets reactors).
NODE_EXTRA = {}
RECEIVERS = ["dicomgate", "dicomgate-none", "dcmtk", "dicom-rs", "pynetdicom", "orthanc"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, seconds=30):
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


class ClusterDb:
    """A PostgreSQL server for receiver dicomgate-cluster, in `work`/pg, on a Unix socket
    there; run as Debian's postgres user when we are root (initdb refuses root)."""

    def __init__(self, work):
        bins = sorted(d for d in (os.path.join("/usr/lib/postgresql", v, "bin")
                                  for v in os.listdir("/usr/lib/postgresql"))
                      if os.path.exists(os.path.join(d, "initdb")))
        if not bins:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin, self.dir = bins[-1], os.path.join(work, "pg")
        self.as_postgres = os.geteuid() == 0
        os.makedirs(self.dir)
        if self.as_postgres:
            os.chmod(work, 0o755)
            subprocess.run(["chown", "postgres:postgres", self.dir], check=True)
        self.port = free_port()
        self.run("initdb", "-D", os.path.join(self.dir, "data"), "-A", "trust", "-U", "postgres",
                 "-E", "UTF8")
        self.start()

    def start(self):
        self.run("pg_ctl", "-D", os.path.join(self.dir, "data"), "-w", "-l",
                 os.path.join(self.dir, "log"), "-o",
                 f"-k {self.dir} -p {self.port} -c listen_addresses=''", "start")

    def stop_fast(self):
        self.run("pg_ctl", "-D", os.path.join(self.dir, "data"), "-w", "-m", "fast", "stop")

    def run(self, tool, *args):
        argv = [os.path.join(self.bin, tool), *args]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout

    def conninfo(self):
        return f"host={self.dir} port={self.port} user=postgres dbname=postgres"

    def rows(self):
        try:
            out = self.run("psql", "-h", self.dir, "-p", str(self.port), "-U", "postgres",
                           "-tAc", "SELECT count(*) FROM dicomgate_instances")
            return int(out.strip() or 0)
        except (subprocess.CalledProcessError, ValueError):
            return 0  # not migrated yet

    def renewed(self):
        """Whether the node has renewed its lease once: before that, a node with a new
        folder (no cluster-live mark) answers every store 0xA700 (docs/cluster.md)."""
        try:
            out = self.run("psql", "-h", self.dir, "-p", str(self.port), "-U", "postgres",
                           "-tAc", "SELECT count(*) FROM dicomgate_nodes "
                           "WHERE lease_until > statement_timestamp()")
            return int(out.strip() or 0) > 0
        except (subprocess.CalledProcessError, ValueError):
            return False  # not migrated yet

    def postmaster(self):
        with open(os.path.join(self.dir, "data", "postmaster.pid")) as f:
            return int(f.readline())

    def stop(self):
        try:
            self.run("pg_ctl", "-D", os.path.join(self.dir, "data"), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass


# The database of each running dicomgate-cluster receiver, by its folder.
CLUSTER_DB = {}
# --cluster-catch-up: the database is stopped during each load and started after it; then
# "every row ... after" is the catch-up time from the database's start (its rows/s the rate
# one node publishes a backlog at), and the database CPU is that of the catch-up.
CATCH_UP = False


def receiver_command(name, work, port):
    """argv and extra environment of one receiver writing under `work`."""
    data = os.path.join(work, "data")
    os.makedirs(data)
    if name.startswith("dicomgate"):
        cfg = os.path.join(work, "node.toml")
        durability = {"dicomgate-none": "none", "dicomgate-syncfs": "syncfs"}.get(name, "fsync")
        # dicomgate-files: every instance its own file (no segment log), as before issue 10;
        # dicomgate-inline-N: inline_max_bytes = N (fsync), for choosing its default.
        inline = "inline_max_bytes = 0\n" if name == "dicomgate-files" else ""
        if name.startswith("dicomgate-inline-"):
            inline = f"inline_max_bytes = {int(name.rsplit('-', 1)[1])}\n"
        node_dir, cluster = f'data_dir = "{data}"\n', ""
        if name == "dicomgate-cluster":
            db = CLUSTER_DB[work] = ClusterDb(work)
            shared = os.path.join(work, "shared")
            os.makedirs(shared)
            # The node's data directory is shared/nodes/<node_id>.
            node_dir = ""
            cluster = (f'[cluster]\npostgres = "{db.conninfo()}"\nnode_id = "bench"\n'
                       f'shared_dir = "{shared}"\n')
        with open(cfg, "w") as f:
            f.write(
                f'[node]\nlisten = "127.0.0.1:{port}"\n{node_dir}'
                + NODE_EXTRA.get("node", "")
                # Any free port for the status page: receivers of a cell run side by side.
                + '[http]\nlisten = "127.0.0.1:0"\n'
                + f'[limits]\nmax_pdu_length = {MAX_PDU}\n'
                # Every sender is one loopback address and one AE title: the per-address and
                # per-AE limits (32 and 64 by default) would refuse scaling runs' senders.
                + 'max_associations = 4096\nmax_associations_per_address = 4096\n'
                + 'max_associations_per_calling_ae = 4096\n'
                + NODE_EXTRA.get("limits", "")
                + f'[storage]\ndurability = "{durability}"\n{inline}'
                + NODE_EXTRA.get("storage", "")
                +
                # Ingest only: no trigger fires, so receivers are compared, not pipelines (a
                # cluster node refuses quiet_seconds = 0: a day is never reached here).
                "[trigger]\non_association_close = false\n"
                + ("quiet_seconds = 86400\n" if cluster else "quiet_seconds = 0\n")
                + cluster
            )
        exe = NODE
        if name == "dicomgate-b":
            exe = os.environ.get("COMPARE_DICOMGATE_B") or sys.exit(
                "receiver dicomgate-b needs COMPARE_DICOMGATE_B (the other build's binary)")
        return [exe, "serve", "--config", cfg], {}
    if name == "dcmtk":
        return (
            ["/usr/bin/storescp", "--fork", "-aet", "DICOMGATE", "--max-pdu", str(MAX_PDU),
             "-od", data, str(port)],
            {"TCP_NODELAY": "1"},
        )
    if name == "dicom-rs":
        exe = shutil.which("dicom-storescp") or os.path.expanduser("~/.cargo/bin/dicom-storescp")
        return [exe, "-n", "-m", str(MAX_PDU), "-o", data, "-p", str(port)], {}
    if name == "pynetdicom":
        return (
            [sys.executable, "-m", "pynetdicom", "storescp", "-aet", "DICOMGATE",
             "--max-pdu", str(MAX_PDU), "-od", data, str(port)],
            {},
        )
    if name == "orthanc":
        cfg = os.path.join(work, "orthanc.json")
        with open(cfg, "w") as f:
            json.dump(
                {
                    "Name": "compare",
                    "StorageDirectory": data,
                    "IndexDirectory": data,
                    "DicomAet": "DICOMGATE",
                    "DicomPort": port,
                    "HttpPort": free_port(),
                    "DicomCheckCalledAet": False,
                    "DicomAlwaysAllowStore": True,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "StorageCompression": False,
                    "MaximumPduLength": MAX_PDU,
                    "Plugins": [],
                },
                f,
            )
        return ["/usr/sbin/Orthanc", cfg], {"TCP_NODELAY": "1"}
    raise ValueError(name)


def tree_pids(root):
    parent = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    s = f.read()
                parent[int(pid)] = int(s[s.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, stack = [], [root]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(c for c, pp in parent.items() if pp == p)
    return out


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    def __init__(self, root):
        super().__init__(daemon=True)
        self.root, self.peak_kib, self.stop = root, 0, threading.Event()
        # Set while this receiver is under load: idle receivers of an interleaved cell do not
        # sample (each scan reads every process's /proc entry).
        self.active = threading.Event()

    def run(self):
        while not self.stop.is_set():
            if not self.active.wait(0.05):
                continue
            total = sum(status_kib(p, "VmRSS") for p in tree_pids(self.root))
            self.peak_kib = max(self.peak_kib, total, status_kib(self.root, "VmHWM"))
            self.stop.wait(0.05)


def thread_cpu_ns(pid, prefix):
    """CPU time (ns, /proc/.../schedstat) of the threads of `pid` whose name starts with
    `prefix`."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            if name.startswith(prefix):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def tree_cpu_ticks(root):
    """utime+stime+cutime+cstime over `root` and its descendants: every process's CPU counted
    once, in itself while it lives (or is a zombie), in its reaper's c-times once reaped."""
    stats = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2:].split()
        stats[int(pid)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    children = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [root]
    while stack:
        p = stack.pop()
        if p in stats:
            total += stats[p][1]
        stack.extend(children.get(p, []))
    return total


class Receiver:
    """One receiver process for one cell (workload × senders): started once, then any number
    of runs of the load against it (`run_once`), then stopped (`close`: the cell's medians).
    Several may be alive at once (the default: receivers take turns): only the one under load
    samples its RSS."""

    def __init__(self, name, workload, senders, window, log):
        self.name, self.workload, self.senders, self.window, self.log = (
            name, workload, senders, window, log)
        self.work = tempfile.mkdtemp(prefix=f"compare-{name}-", dir=os.environ.get("COMPARE_DIR"))
        self.port = free_port()
        argv, extra = receiver_command(name, self.work, self.port)
        env = dict(os.environ, **extra)
        self.out = open(os.path.join(self.work, "receiver.log"), "w")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                     cwd=self.work, start_new_session=True)
        self.results = []
        self.rss = RssSampler(self.proc.pid)
        self.db, self.stored = CLUSTER_DB.get(self.work), 0
        try:
            wait_port(self.port, self.proc)
            deadline = time.monotonic() + 30
            while self.db and not self.db.renewed():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: no lease renewal in 30 s (see {self.work})")
                time.sleep(0.05)
            self.rss.start()
            time.sleep(0.3)
        except BaseException:
            self.stop()
            raise

    def run_once(self):
        name, workload, senders, db, proc = (
            self.name, self.workload, self.senders, self.db, self.proc)
        pixel_bytes, frames, per_sender = WORKLOADS[workload]
        os.sync()  # each run starts with no dirty pages from the one before
        c0 = tree_cpu_ticks(proc.pid)
        if db and CATCH_UP:
            # The database is down while the load runs: the node acknowledges locally,
            # queues, and publishes once the database is back (the catch-up below).
            db.stop_fast()
        d0 = tree_cpu_ticks(db.postmaster()) if db and not CATCH_UP else 0
        p0 = thread_cpu_ns(proc.pid, "cluster") if db else 0
        r0 = os.times()
        self.rss.active.set()
        try:
            lg = subprocess.run(
                [LOADGEN, f"127.0.0.1:{self.port}", "--associations", str(senders),
                 "--instances", str(per_sender[senders]), "--pixel-bytes", str(pixel_bytes),
                 "--frames", str(frames), "--window", str(self.window), "--max-pdu",
                 str(MAX_PDU), "--json"],
                capture_output=True, text=True, timeout=900,
            )
        finally:
            self.rss.active.clear()
        r1, t1 = os.times(), time.monotonic()
        if db:
            # The database's CPU while the load ran (before the polls below, whose own
            # backends would count), then how long until every acknowledged record is in
            # it, after the loadgen's end.
            if CATCH_UP:
                # From the database's start: the first rows (the node reconnects after its
                # back-off), then the rest; the rate is over rows after the first seen.
                db.start()
                t1, d0 = time.monotonic(), tree_cpu_ticks(db.postmaster())
                want = self.stored + json.loads(lg.stdout)["instances"]
                first = None
                while time.monotonic() < t1 + 120:
                    have = db.rows()
                    if first is None and have > self.stored:
                        first = (time.monotonic(), have)
                    if have >= want:
                        break
                if first:
                    last = time.monotonic()
                    catch_up = (first[0] - t1, (want - first[1]) / max(last - first[0], 1e-3))
            d1 = tree_cpu_ticks(db.postmaster())
            p1 = thread_cpu_ns(proc.pid, "cluster")
            self.stored += json.loads(lg.stdout)["instances"] if lg.returncode == 0 else 0
            end = t1 + 120
            while db.rows() < self.stored and time.monotonic() < end:
                time.sleep(0.02)
            published_after = time.monotonic() - t1
        time.sleep(0.3)  # forked children exit and are reaped after the release
        c1 = tree_cpu_ticks(proc.pid)
        if lg.returncode != 0:
            raise RuntimeError(f"loadgen failed: {lg.stderr.strip()[-500:]}")
        r = json.loads(lg.stdout)
        n = max(r["instances"], 1)
        r["server_cpu_us"] = (c1 - c0) / TCK * 1e6 / n
        if db:
            if db.rows() < self.stored:
                raise RuntimeError(f"only {db.rows()} of {self.stored} rows published in 120 s")
            r["published_after_s"] = published_after
            r["db_cpu_us"] = (d1 - d0) / TCK * 1e6 / n
            # The node's own publishing: its `cluster` thread (part of server_cpu_us).
            r["publish_cpu_us"] = (p1 - p0) / 1e3 / n
            r["published_rows_per_s"] = r["instances"] / (r["seconds"] + published_after)
            if CATCH_UP:
                # (seconds from the database's start to the first rows, rows/s after them)
                r["reconnect_s"], r["published_rows_per_s"] = catch_up
        sender = (r1.children_user + r1.children_system) - (r0.children_user + r0.children_system)
        r["sender_cpu_us"] = sender * 1e6 / n
        self.results.append(r)
        print(f"  {name:15} {workload}/{senders}: {r['instances_per_s']:9.1f} inst/s "
              f"{r['mb_per_s']:8.1f} MB/s  server {r['server_cpu_us']:8.0f} us/inst",
              file=self.log, flush=True)

    def stop(self):
        rss, proc = self.rss, self.proc
        rss.stop.set()
        if rss.is_alive():
            rss.join()
        rss.peak_kib = max(rss.peak_kib, status_kib(proc.pid, "VmHWM"))
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except ProcessLookupError:
            proc.wait()
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.out.close()
        if self.db:
            self.db.stop()
            CLUSTER_DB.pop(self.work, None)
        shutil.rmtree(self.work, ignore_errors=True)

    def close(self):
        """Stops the receiver; the cell's medians over its runs."""
        self.stop()
        results = self.results
        if not results:
            raise RuntimeError("no run completed")
        return {
            "receiver": self.name,
            "runs": results,
            "instances_per_s": statistics.median(r["instances_per_s"] for r in results),
            "mb_per_s": statistics.median(r["mb_per_s"] for r in results),
            "server_cpu_us": statistics.median(r["server_cpu_us"] for r in results),
            "sender_cpu_us": statistics.median(r["sender_cpu_us"] for r in results),
            "p50_us": statistics.median(r["latency_us"]["p50"] for r in results),
            "p99_us": statistics.median(r["latency_us"]["p99"] for r in results),
            "peak_rss_mb": self.rss.peak_kib / 1024,
            **({
                "db_cpu_us": statistics.median(r["db_cpu_us"] for r in results),
                "publish_cpu_us": statistics.median(r["publish_cpu_us"] for r in results),
                "published_after_s": statistics.median(r["published_after_s"] for r in results),
                "published_rows_per_s": statistics.median(
                    r["published_rows_per_s"] for r in results),
                **({"reconnect_s": statistics.median(r["reconnect_s"] for r in results)}
                   if CATCH_UP else {}),
            } if self.db else {}),
        }


def run_receiver(name, workload, senders, runs, window, log):
    """`runs` runs against one receiver, one after the other (perf/scaling.py)."""
    rec = Receiver(name, workload, senders, window, log)
    try:
        for _ in range(runs):
            rec.run_once()
    except BaseException:
        rec.stop()
        raise
    return rec.close()


def run_cell(names, workload, senders, runs, window, interleave, log):
    """The cell's rows. With `interleave`, every receiver is started first and the runs take
    turns (run i starts with receiver i mod n), so a machine that drifts during the cell
    (perf/RESULTS.md: this VM's memory) weighs on every receiver alike; otherwise each
    receiver's runs follow one another, one receiver after the other."""
    rows = []
    if not interleave:
        for name in names:
            try:
                rows.append(run_receiver(name, workload, senders, runs, window, log))
            except Exception as e:  # one receiver failing does not lose the others' rows
                print(f"  {name} {workload}/{senders}: FAILED: {e}", file=log, flush=True)
        return rows
    live = []
    for name in names:
        try:
            live.append(Receiver(name, workload, senders, window, log))
        except Exception as e:
            print(f"  {name} {workload}/{senders}: FAILED to start: {e}", file=log, flush=True)
    failed = set()
    try:
        for i in range(runs):
            for k in range(len(live)):
                rec = live[(i + k) % len(live)]
                if rec.name in failed:
                    continue
                try:
                    rec.run_once()
                except Exception as e:
                    print(f"  {rec.name} {workload}/{senders}: FAILED: {e}", file=log, flush=True)
                    failed.add(rec.name)
    finally:
        for rec in live:
            try:
                row = rec.close()
                if rec.name not in failed:
                    rows.append(row)
            except Exception as e:
                print(f"  {rec.name} {workload}/{senders}: {e}", file=log, flush=True)
    return rows


def table(workload, senders, rows):
    base = next((r for r in rows if r["receiver"] == "dicomgate"), rows[0])
    px, frames, per = WORKLOADS[workload]
    lines = [
        f"### {workload} ({px} pixel bytes, {frames} frame(s)), {senders} sender(s) × "
        f"{per[senders]} instances",
        "",
        "| receiver | inst/s | MB/s | server CPU µs/inst | peak RSS MB | p50 ms | p99 ms "
        "| rate ÷ dicomgate | CPU ÷ dicomgate | RSS ÷ dicomgate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = lambda k: r[k] / base[k] if base[k] else float("nan")
        lines.append(
            f"| {r['receiver']} | {r['instances_per_s']:,.0f} | {r['mb_per_s']:,.1f} "
            f"| {r['server_cpu_us']:,.0f} | {r['peak_rss_mb']:,.0f} | {r['p50_us'] / 1000:.2f} "
            f"| {r['p99_us'] / 1000:.2f} | {ratio('instances_per_s'):.2f} "
            f"| {ratio('server_cpu_us'):.2f} | {ratio('peak_rss_mb'):.2f} |"
        )
    return "\n".join(lines)


def probe(base):
    """The disk's floor, on the file system the receivers write to: p50 of a 4 KiB pwrite +
    fdatasync into a preallocated (written) file, and sequential write bandwidth with one final
    fdatasync."""
    d = tempfile.mkdtemp(prefix="probe-", dir=base)
    try:
        path = os.path.join(d, "probe.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        zero = bytes(1 << 20)
        for _ in range(16):
            os.write(fd, zero)
        os.fsync(fd)
        buf = os.urandom(4096)
        lat = []
        for i in range(2000):
            t = time.perf_counter()
            os.pwrite(fd, buf, (i % 4096) * 4096)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
        os.close(fd)
        os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        chunk = os.urandom(1 << 20)
        t = time.perf_counter()
        for _ in range(512):
            os.write(fd, chunk)
        os.fdatasync(fd)
        bw = 512 * (1 << 20) / (time.perf_counter() - t) / 1e6
        os.close(fd)
        # The same file again: overwriting allocated blocks (what the segment log does in its
        # prepared segments), 0.5 MB writes with an fdatasync every 4.
        fd = os.open(path, os.O_WRONLY)
        half = os.urandom(1 << 19)
        t = time.perf_counter()
        for i in range(1024):
            os.pwrite(fd, half, i * (1 << 19))
            if i % 4 == 3:
                os.fdatasync(fd)
        over = 512 * (1 << 20) / (time.perf_counter() - t) / 1e6
        os.close(fd)
        return {"fdatasync_4k_p50_ms": statistics.median(lat) * 1e3, "seq_write_mb_per_s": bw,
                "overwrite_mb_per_s": over}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def memory_probe():
    """µs per 4 KiB page of a first write to fresh anonymous memory, after a second of idle
    (pages the kernel takes from its free lists; Python's loop adds ~0.1 µs).
    In a VM whose balloon reports free pages to the host (this one: virtio_balloon with free
    page reporting), the first figure includes the host's fault; every receiver's page cache
    grows into such pages, so this is a floor under the cost of writing new data."""
    import mmap
    n, page = 1 << 30, 4096

    def touch():
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        t = time.perf_counter()
        for off in range(0, n, page):
            m[off] = 1
        dt = time.perf_counter() - t
        m.close()
        return dt * 1e6 / (n // page)

    time.sleep(1)
    return {"fresh_us_per_page": touch()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="tiny,ct,large")
    ap.add_argument("--senders", default="1,8")
    ap.add_argument("--receivers", default=",".join(RECEIVERS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--json", help="also write every run's figures here")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--no-interleave", action="store_true",
                    help="each receiver's runs one after the other (the default takes turns)")
    ap.add_argument("--cluster-catch-up", action="store_true",
                    help="dicomgate-cluster: stop its database during each load, then time "
                         "the publication of the backlog once it is started again")
    ap.add_argument("--limits", default="",
                    help="extra TOML lines for dicomgate's [limits], e.g. 'max_buffered_bytes = 33554432'")
    a = ap.parse_args()
    global CATCH_UP
    CATCH_UP = a.cluster_catch_up
    if a.limits:
        NODE_EXTRA["limits"] = a.limits.replace(";", "\n") + "\n"
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "--bins"], cwd=ROOT, check=True)
    everything = []
    print(f"# perf/compare.py {' '.join(sys.argv[1:])}")
    print(f"# {os.cpu_count()} CPUs; TCP_NODELAY=1 set for DCMTK and Orthanc; max PDU {MAX_PDU}; "
          f"medians of {a.runs} runs; ratios to dicomgate (fsync)\n")
    if not a.no_probe:
        p = probe(os.environ.get("COMPARE_DIR") or tempfile.gettempdir())
        print(f"# probe (same file system): 4 KiB pwrite + fdatasync into a preallocated file "
              f"p50 {p['fdatasync_4k_p50_ms']:.3f} ms; sequential write + one fdatasync "
              f"{p['seq_write_mb_per_s']:.0f} MB/s; overwriting allocated blocks, fdatasync "
              f"every 2 MB {p['overwrite_mb_per_s']:.0f} MB/s\n", flush=True)
        m = memory_probe()
        print(f"# memory probe: first write to 1 GiB of fresh anonymous memory {m['fresh_us_per_page']:.2f} µs "
              f"per 4 KiB page (perf/RESULTS.md: this VM hands free memory "
              f"back to its host, and a page taken again costs a fault there)\n", flush=True)
        p.update(m)
        everything.append({"probe": p})
    for w in a.workloads.split(","):
        for s in (int(x) for x in a.senders.split(",")):
            rows = run_cell(a.receivers.split(","), w, s, a.runs, a.window, not a.no_interleave,
                            sys.stderr)
            if rows:
                print(table(w, s, rows) + "\n", flush=True)
                for r in rows:
                    if "reconnect_s" in r:
                        print(f"{r['receiver']}, database stopped during the load: first rows "
                              f"{r['reconnect_s']:.2f} s after its start (the node's reconnection "
                              f"back-off), then the backlog at {r['published_rows_per_s']:,.0f} "
                              f"rows/s; the database's CPU {r['db_cpu_us']:,.0f} µs per row, the "
                              f"`cluster` thread's {r['publish_cpu_us']:,.1f} µs (medians)\n",
                              flush=True)
                    elif "db_cpu_us" in r:
                        print(f"{r['receiver']}: its `cluster` thread's CPU "
                              f"{r['publish_cpu_us']:,.1f} µs per instance (in the server CPU "
                              f"above), the database's {r['db_cpu_us']:,.0f} µs, while the load "
                              f"ran; every row in the database {r['published_after_s']:.2f} s "
                              f"after the loadgen ended; {r['published_rows_per_s']:,.0f} rows/s "
                              f"from the first store to the last row (medians)\n", flush=True)
                everything.append({"workload": w, "senders": s, "rows": rows})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
