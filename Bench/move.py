#!/usr/bin/env python3
"""Keel's replica-move benchmark, in one run on this host (release build, fio's nbd
engine, replicas on unix sockets, `keel volume` with its own state directory):

1. A move of all three replicas of a written volume to three fresh ones with no other
   I/O: the copy's rate (the idle rebuild rate).
2. 4k randwrite for --runtime seconds on the volume's engine (`keel volume attach
   --no-device`) before a move, then the same job while the volume moves to three more
   fresh replicas: the IOPS during the move against before (goal: at least 0.85 x, the
   Cinder spec's 15 % drop), and the copy's rate meanwhile against the idle one (goal:
   at least 0.5 x). The volume is --size large, so that the copy outlasts the job.
3. With --ceiling, also: the same job on volumes of 4 and 6 replicas (no move) against 3,
   in turn: what a move that sends the writes behind its copy to one or three more
   replicas can reach at best on this host, and the CPU time a write costs in each process.

With --rate-iops N the job is held to N IOPS before and during the move: a volume
written below its peak, whose writes the move should not slow (p99 completion times
are printed in every case).

Usage: Bench/move [--size 4G] [--runtime 10] [--depth 32] [--rounds 3] [--rate-iops N] [--ceiling] [--dir DIR]
                  [--json FILE]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import REPO, Server, cpu_seconds  # noqa: E402


def fio_randwrite(uri, depth, runtime, size, rate=None):
    """4k randwrite on the volume: (IOPS, fio's job record); at most `rate` IOPS if given."""
    argv = ["fio", "--output-format=json", "--name=job", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", f"--iodepth={depth}", f"--size={size}", "--randrepeat=0", "--norandommap",
            f"--runtime={runtime}", "--time_based"] + ([f"--rate_iops={rate}"] if rate else [])
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["write"]["iops"], job


def p99_ms(job):
    return job["write"]["clat_ns"]["percentile"]["99.000000"] / 1e6


def busy_seconds():
    """CPU time this machine spent on anything but idle and iowait, in seconds (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def with_busy_cores(job):
    """Runs `job`: (its result, the cores this machine kept busy meanwhile on average)."""
    busy, start = busy_seconds(), time.monotonic()
    result = job()
    return result, (busy_seconds() - busy) / (time.monotonic() - start)


def volume_pids(name):
    """The engine's and the replicas' pids of volume `name` (from their command lines)."""
    engine, replicas = [], []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                argv = f.read().split("\0")
        except OSError:
            continue
        if argv[1:3] == ["engine", "serve"] and "--volume" in argv and argv[argv.index("--volume") + 1:][:1] == [name]:
            engine.append(int(pid))
        elif argv[1:3] == ["replica", "serve"] and any(f"/replicas/{name}/" in a for a in argv):
            replicas.append(int(pid))
    return engine, replicas


def settle():
    """Written data reaches the disk and the old replicas' deletion is done before the next measurement."""
    os.sync()
    time.sleep(2)


class Bench:
    def __init__(self, keel, work, size):
        self.keel, self.work, self.size = keel, work, size
        self.state = os.path.join(work, "state")
        self.fresh = 0
        self.servers = []

    def cli(self, *args):
        return subprocess.run([self.keel, *args, "--state-dir", self.state], check=True, capture_output=True, text=True).stdout

    def migration(self):
        return json.loads(self.cli("migrate", "status", "vol", "--json"))

    def fresh_replicas(self, count):
        """`keel replica serve` on new unix sockets; their addresses."""
        addresses = []
        for _ in range(count):
            self.fresh += 1
            sock = os.path.join(self.work, f"new{self.fresh}.sock")
            server = Server("replica", [self.keel, "replica", "serve", "--dir", os.path.join(self.work, f"new{self.fresh}"),
                                        "--listen", f"unix:{sock}", "--size", self.size], sock).__enter__()
            self.servers.append(server)
            addresses.append(f"unix:{sock}")
        return addresses

    def move(self, addresses):
        """Starts `keel volume move`; returns the process."""
        argv = [self.keel, "volume", "move", "vol", "--json", "--state-dir", self.state]
        for address in addresses:
            argv += ["--replica", address]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def copy_window(self, process):
        """Polls the move until it ends: (bytes copied, seconds, cores busy) between the first 'copying' and
        'removing' (the poll's own `keel migrate status` counted in)."""
        first = last = None
        while process.poll() is None:
            status = self.migration()
            now, busy = time.monotonic(), busy_seconds()
            if status.get("phase", "").startswith("copying") and first is None:
                first = (status["bytes_done"], now, busy)
            if status.get("phase", "") in ("removing", "done") and first is not None and last is None:
                last = (status["bytes_total"], now, busy)
            time.sleep(0.05)
        if process.returncode != 0:
            raise RuntimeError(f"keel volume move failed: {process.stderr.read()}")
        if last is None:
            status = self.migration()
            last = (status["bytes_total"], time.monotonic(), busy_seconds())
        seconds = last[1] - first[1]
        return last[0] - first[0], seconds, (last[2] - first[2]) / seconds

    def ceiling(self, depth, runtime, rounds):
        """IOPS of volumes of 3, 4 and 6 replicas, the job run on each in turn; the ratios against 3 (medians)."""
        uris = {}
        for count in (3, 4, 6):
            self.cli("volume", "create", f"c{count}", "--size", self.size, "--replicas", str(count))
            uris[count] = self.cli("volume", "attach", f"c{count}", "--no-device").strip()
            subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uris[count]}", "--rw=write", "--bs=1M",
                            "--iodepth=8", f"--size={self.size}", "--output=/dev/null"], check=True)
        ratios = {4: [], 6: []}
        cost = {count: [] for count in (3, 4, 6)}
        for round_ in range(rounds):
            iops = {}
            for count in (3, 4, 6):
                settle()
                engine, replicas = volume_pids(f"c{count}")
                before = [busy_seconds(), sum(map(cpu_seconds, engine)), sum(map(cpu_seconds, replicas))]
                iops[count], job = fio_randwrite(uris[count], depth, runtime, self.size)
                after = [busy_seconds(), sum(map(cpu_seconds, engine)), sum(map(cpu_seconds, replicas))]
                writes = job["write"]["total_ios"]
                busy, in_engine, in_replicas = ((b - a) * 1e6 / writes for a, b in zip(before, after))
                in_fio = (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime * 1e6 / writes
                cost[count].append((busy, in_engine, in_replicas / count, in_fio))
            for count in (4, 6):
                ratios[count].append(iops[count] / iops[3])
            print(f"  ceiling round {round_ + 1}: " + ", ".join(f"{c} replicas {round(iops[c])} IOPS" for c in (3, 4, 6)),
                  flush=True)
        for count in (3, 4, 6):
            busy, in_engine, per_replica, in_fio = (sorted(c[i] for c in cost[count])[len(cost[count]) // 2] for i in range(4))
            print(f"  ceiling, CPU per write with {count} replicas (medians): {busy:.0f} us busy on the host, engine "
                  f"{in_engine:.0f} us, each replica {per_replica:.0f} us, fio {in_fio:.0f} us", flush=True)
        for count in (3, 4, 6):
            self.cli("volume", "detach", f"c{count}")
            self.cli("volume", "rm", f"c{count}", "--force")
        return {count: round(sorted(r)[len(r) // 2], 3) for count, r in ratios.items()}

    def close(self):
        for name in ("vol", "c3", "c4", "c6"):
            subprocess.run([self.keel, "volume", "detach", name, "--state-dir", self.state], capture_output=True)
        for name in ("c3", "c4", "c6"):  # a ceiling cut short: their replicas here
            subprocess.run([self.keel, "volume", "rm", name, "--force", "--state-dir", self.state], capture_output=True)
        for server in reversed(self.servers):
            server.__exit__(None, None, None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="4G")
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate-iops", type=int, help="the 4k randwrite job at most this fast (before and during the move)")
    parser.add_argument("--ceiling", action="store_true", help="also measure volumes of 4 and 6 replicas against 3")
    parser.add_argument("--dir", default=None, help="where the replicas live (default: a directory under /var/tmp)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    subprocess.run(["swift", "build", "-c", "release", "--product", "keel"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    keel = os.path.join(REPO, ".build/release/keel")
    work = tempfile.mkdtemp(prefix="keel-movebench-", dir=args.dir or "/var/tmp")
    bench = Bench(keel, work, args.size)
    results = {"size": args.size, "runtime": args.runtime, "depth": args.depth, "rate_iops": args.rate_iops,
               "rounds": []}
    try:
        bench.cli("volume", "create", "vol", "--size", args.size, "--replicas", "3")
        uri = bench.cli("volume", "attach", "vol", "--no-device").strip()
        print(f"move: filling the {args.size} volume", flush=True)
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M", "--iodepth=8",
                        f"--size={args.size}", "--output=/dev/null"], check=True)
        for round_ in range(args.rounds):
            settle()
            moved, seconds, busy_idle_copy = bench.copy_window(bench.move(bench.fresh_replicas(3)))
            idle_rate = moved / seconds / 2**20
            settle()
            (before, job_before), busy_before = with_busy_cores(
                lambda: fio_randwrite(uri, args.depth, args.runtime, args.size, args.rate_iops))
            settle()
            process = bench.move(bench.fresh_replicas(3))
            # The job starts once the copy does, and the copy's progress is read at its start and end.
            while not bench.migration().get("phase", "").startswith("copying"):
                time.sleep(0.05)
            start = (bench.migration()["bytes_done"], time.monotonic())
            (during, job_during), busy_during = with_busy_cores(
                lambda: fio_randwrite(uri, args.depth, args.runtime, args.size, args.rate_iops))
            status = bench.migration()
            end = (status["bytes_done"], time.monotonic())
            still_copying = status.get("phase", "").startswith("copying")
            busy_rate = (end[0] - start[0]) / (end[1] - start[1]) / 2**20
            bench.copy_window(process)
            row = {"idle_copy_mibs": round(idle_rate, 1), "iops_before": round(before), "iops_during": round(during),
                   "iops_ratio": round(during / before, 3), "copy_during_mibs": round(busy_rate, 1),
                   "copy_ratio": round(busy_rate / idle_rate, 3), "copy_outlasted_job": still_copying,
                   "p99_ms_before": round(p99_ms(job_before), 2), "p99_ms_during": round(p99_ms(job_during), 2),
                   "busy_cores_idle_copy": round(busy_idle_copy, 2),
                   "busy_cores_before": round(busy_before, 2), "busy_cores_during": round(busy_during, 2)}
            results["rounds"].append(row)
            print(f"  round {round_ + 1}: idle copy {row['idle_copy_mibs']} MiB/s ({row['busy_cores_idle_copy']} "
                  f"cores busy); 4k randwrite QD{args.depth} "
                  f"{row['iops_before']} IOPS before, {row['iops_during']} during the move ({row['iops_ratio']} x); "
                  f"copy meanwhile {row['copy_during_mibs']} MiB/s ({row['copy_ratio']} x idle); p99 completion "
                  f"{row['p99_ms_before']} -> {row['p99_ms_during']} ms; cores busy {row['busy_cores_before']} -> "
                  f"{row['busy_cores_during']}"
                  + ("" if still_copying else "; the copy ended before the job: raise --size"), flush=True)
        rows = results["rounds"]
        for key in ("iops_ratio", "copy_ratio"):
            results[key + "_median"] = sorted(r[key] for r in rows)[len(rows) // 2]
        print(f"move: IOPS during / before (median) {results['iops_ratio_median']} (goal >= 0.85); "
              f"copy during / idle (median) {results['copy_ratio_median']} (goal >= 0.5)")
        if args.ceiling:
            results["ceiling"] = bench.ceiling(args.depth, args.runtime, args.rounds)
            print(f"move: ceiling, IOPS of 4 and 6 replicas / 3 (median) {results['ceiling'][4]}, {results['ceiling'][6]}")
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
