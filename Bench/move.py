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
   replicas can reach at best on this host.

Usage: Bench/move [--size 4G] [--runtime 10] [--depth 32] [--rounds 3] [--ceiling] [--dir DIR] [--json FILE]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import REPO, Server  # noqa: E402


def fio_randwrite(uri, depth, runtime, size):
    argv = ["fio", "--output-format=json", "--name=job", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", f"--iodepth={depth}", f"--size={size}", "--randrepeat=0", "--norandommap",
            f"--runtime={runtime}", "--time_based"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]


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
        """Polls the move until it ends: (bytes copied, seconds) between the first 'copying' and 'removing'."""
        first = last = None
        while process.poll() is None:
            status = self.migration()
            now = time.monotonic()
            if status.get("phase", "").startswith("copying") and first is None:
                first = (status["bytes_done"], now)
            if status.get("phase", "") in ("removing", "done") and first is not None and last is None:
                last = (status["bytes_total"], now)
            time.sleep(0.05)
        if process.returncode != 0:
            raise RuntimeError(f"keel volume move failed: {process.stderr.read()}")
        if last is None:
            status = self.migration()
            last = (status["bytes_total"], time.monotonic())
        return last[0] - first[0], last[1] - first[1]

    def ceiling(self, depth, runtime, rounds):
        """IOPS of volumes of 3, 4 and 6 replicas, the job run on each in turn; the ratios against 3 (medians)."""
        uris = {}
        for count in (3, 4, 6):
            self.cli("volume", "create", f"c{count}", "--size", self.size, "--replicas", str(count))
            uris[count] = self.cli("volume", "attach", f"c{count}", "--no-device").strip()
            subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uris[count]}", "--rw=write", "--bs=1M",
                            "--iodepth=8", f"--size={self.size}", "--output=/dev/null"], check=True)
        ratios = {4: [], 6: []}
        for round_ in range(rounds):
            iops = {}
            for count in (3, 4, 6):
                settle()
                iops[count] = fio_randwrite(uris[count], depth, runtime, self.size)
            for count in (4, 6):
                ratios[count].append(iops[count] / iops[3])
            print(f"  ceiling round {round_ + 1}: " + ", ".join(f"{c} replicas {round(iops[c])} IOPS" for c in (3, 4, 6)),
                  flush=True)
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
    parser.add_argument("--ceiling", action="store_true", help="also measure volumes of 4 and 6 replicas against 3")
    parser.add_argument("--dir", default=None, help="where the replicas live (default: a directory under /var/tmp)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    subprocess.run(["swift", "build", "-c", "release", "--product", "keel"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    keel = os.path.join(REPO, ".build/release/keel")
    work = tempfile.mkdtemp(prefix="keel-movebench-", dir=args.dir or "/var/tmp")
    bench = Bench(keel, work, args.size)
    results = {"size": args.size, "runtime": args.runtime, "depth": args.depth, "rounds": []}
    try:
        bench.cli("volume", "create", "vol", "--size", args.size, "--replicas", "3")
        uri = bench.cli("volume", "attach", "vol", "--no-device").strip()
        print(f"move: filling the {args.size} volume", flush=True)
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M", "--iodepth=8",
                        f"--size={args.size}", "--output=/dev/null"], check=True)
        for round_ in range(args.rounds):
            settle()
            moved, seconds = bench.copy_window(bench.move(bench.fresh_replicas(3)))
            idle_rate = moved / seconds / 2**20
            settle()
            before = fio_randwrite(uri, args.depth, args.runtime, args.size)
            settle()
            process = bench.move(bench.fresh_replicas(3))
            # The job starts once the copy does, and the copy's progress is read at its start and end.
            while not bench.migration().get("phase", "").startswith("copying"):
                time.sleep(0.05)
            start = (bench.migration()["bytes_done"], time.monotonic())
            during = fio_randwrite(uri, args.depth, args.runtime, args.size)
            status = bench.migration()
            end = (status["bytes_done"], time.monotonic())
            still_copying = status.get("phase", "").startswith("copying")
            busy_rate = (end[0] - start[0]) / (end[1] - start[1]) / 2**20
            bench.copy_window(process)
            row = {"idle_copy_mibs": round(idle_rate, 1), "iops_before": round(before), "iops_during": round(during),
                   "iops_ratio": round(during / before, 3), "copy_during_mibs": round(busy_rate, 1),
                   "copy_ratio": round(busy_rate / idle_rate, 3), "copy_outlasted_job": still_copying}
            results["rounds"].append(row)
            print(f"  round {round_ + 1}: idle copy {row['idle_copy_mibs']} MiB/s; 4k randwrite QD{args.depth} "
                  f"{row['iops_before']} IOPS before, {row['iops_during']} during the move ({row['iops_ratio']} x); "
                  f"copy meanwhile {row['copy_during_mibs']} MiB/s ({row['copy_ratio']} x idle)"
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
