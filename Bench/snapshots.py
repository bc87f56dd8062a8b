#!/usr/bin/env python3
"""Keel's snapshot benchmark, in one run on this host (fio's nbd engine, an
engine with loopback replicas, release build):

1. 4k randread QD32 on a volume whose data was written in 10 passes with a
   snapshot after each (its blocks spread over 11 layers), against a volume
   given the same writes without snapshots (goal: at least 0.9 x); and on a
   volume with 1000 snapshots (reported).
2. 4k randwrite QD32 just after a snapshot (every first write to a block of
   the new head records it in the head's map), against the same volume with
   no snapshot taken.
3. The I/O pause of a snapshot as the client sees it: the largest completion
   latency of a 4k randwrite QD32 run in which a snapshot is taken, against
   the same run without one (goal: the difference under 20 ms).

Usage: Bench/snapshots [--size 1G] [--replicas 3] [--runtime 8] [--many 1000] [--parts reads,writes,pause,chain]
                       [--dir DIR] [--json FILE]
"""
import argparse, json, os, random, shutil, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import REPO, Cluster, drop_caches  # noqa: E402


def fio(uri, rw, depth, runtime, size, extra=()):
    argv = ["fio", "--output-format=json", "--name=job", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
            "--bs=4k", f"--iodepth={depth}", f"--size={size}", "--randrepeat=0", "--norandommap"] + list(extra)
    if runtime:
        argv += [f"--runtime={runtime}", "--time_based"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if rw.endswith("read") else job["write"]
    return {"iops": side["iops"], "clat_max_ms": side["clat_ns"]["max"] / 1e6,
            "clat_p99_ms": side["clat_ns"]["percentile"]["99.000000"] / 1e6}


def fill_pass(uri, size, seed, share=10):
    """4k random writes over 1/share of the volume (the same blocks for the same seed)."""
    subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                    "--iodepth=32", f"--size={size}", f"--io_size={parse_size(size) // share}",
                    f"--randseed={seed}", "--output=/dev/null"], check=True)


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


class Volume:
    """A cluster of N replicas with an engine and its control socket."""

    def __init__(self, keel, workdir, name, replicas, size):
        self.keel = keel
        tmp = tempfile.mkdtemp(prefix=f"keel-snapbench-{name}-")
        self.sock = os.path.join(tmp, "nbd.sock")
        self.control = "unix:" + os.path.join(tmp, "control.sock")
        self.uri = f"nbd+unix:///bench?socket={self.sock}"
        self.cluster = Cluster(keel, workdir, name, replicas, size, self.sock, None,
                               engine_extra=["--control", self.control])
        self.snapshots = 0

    def __enter__(self):
        self.cluster.__enter__()
        return self

    def __exit__(self, *exc):
        self.cluster.__exit__(*exc)

    def snapshot(self):
        self.snapshots += 1
        subprocess.run([self.keel, "snapshot", "create", "bench", f"s{self.snapshots}", "--engine", self.control],
                       check=True, stdout=subprocess.DEVNULL)

    def remove(self):
        self.cluster.remove()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--many", type=int, default=1000, help="the long chain's snapshots")
    ap.add_argument("--parts", default="reads,writes,pause,chain", help="which of the measures to take")
    ap.add_argument("--dir", default=os.environ.get("KEEL_BENCH_DIR", "/var/tmp/keel-bench"))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    parts = args.parts.split(",")
    subprocess.run(["swift", "build", "-c", "release", "--product", "keel"], cwd=REPO, check=True)
    keel = os.path.join(REPO, ".build", "release", "keel")
    os.makedirs(args.dir, exist_ok=True)
    results = {}

    def report(label, value):
        results[label] = value
        print(f"  {label}: {value}", flush=True)

    # 1. Reads through 11 layers against the same writes in one.
    print("snapshots: writing 10 passes into a volume with a snapshot after each, and into one without", flush=True)
    with Volume(keel, args.dir, "flat", args.replicas, args.size) as flat, \
         Volume(keel, args.dir, "layered", args.replicas, args.size) as layered:
        for seed in range(1, 11):
            if "reads" in parts or seed == 1:
                fill_pass(flat.uri, args.size, seed)
                fill_pass(layered.uri, args.size, seed)
            layered.snapshot()
        rounds = {"flat": [], "layered": []}
        for _ in range(2 if "reads" in parts else 0):
            for name, volume in (("flat", flat), ("layered", layered)):
                drop_caches()
                rounds[name].append(fio(volume.uri, "randread", 32, args.runtime, args.size)["iops"])
        if "reads" in parts:
            flat_iops, layered_iops = max(rounds["flat"]), max(rounds["layered"])
            report("randread QD32, no snapshot (IOPS)", round(flat_iops))
            report("randread QD32, 10 snapshots (IOPS)", round(layered_iops))
            report("randread QD32, 10 snapshots / none", round(layered_iops / flat_iops, 3))

    # 2. Writes just after a snapshot against writes with none.
    if "writes" in parts:
        with flat, layered:
            drop_caches()
            plain = fio(flat.uri, "randwrite", 32, args.runtime, args.size)
            layered.snapshot()
            drop_caches()
            after = fio(layered.uri, "randwrite", 32, args.runtime, args.size)
        report("randwrite QD32, no snapshot (IOPS)", round(plain["iops"]))
        report("randwrite QD32, just after a snapshot (IOPS)", round(after["iops"]))
        report("randwrite QD32, after a snapshot / none", round(after["iops"] / plain["iops"], 3))

    # 3. The pause: the largest completion latency with a snapshot in the run, against the
    #    same run without one, and against one with a FLUSH at the same moment (a snapshot
    #    makes its records durable, and on ext4 under allocating writes any journal commit
    #    stalls writers: that is the FLUSH's cost too). Three of each after a warm-up, medians;
    #    and the engine's own hold of writes, from its log.
    if "pause" in parts:
        import nbd
        runs = {"none": [], "flush": [], "snapshot": []}

        def flush_once():
            handle = nbd.NBD()
            handle.connect_uri(layered.uri)
            handle.flush()
            handle.shutdown()

        with layered:
            fio(layered.uri, "randwrite", 32, 3, args.size)
            for _ in range(3):
                for kind, action in (("none", None), ("flush", flush_once), ("snapshot", layered.snapshot)):
                    timer = threading.Timer(args.runtime / 2, action) if action else None
                    if timer:
                        timer.start()
                    runs[kind].append(fio(layered.uri, "randwrite", 32, args.runtime, args.size)["clat_max_ms"])
                    if timer:
                        timer.join()
            engine_log = layered.cluster.servers[-1].log
            engine_log.seek(0)
            held = [float(line.split("writes held for ")[1].split()[0]) * 1000
                    for line in engine_log.read().decode().splitlines() if "writes held for" in line]
        medians = {kind: sorted(values)[1] for kind, values in runs.items()}
        report("randwrite QD32 max completion latency, no snapshot (ms, median of 3)", round(medians["none"], 2))
        report("randwrite QD32 max completion latency, one FLUSH (ms, median of 3)", round(medians["flush"], 2))
        report("randwrite QD32 max completion latency, one snapshot (ms, median of 3)", round(medians["snapshot"], 2))
        report("snapshot pause seen by the client, against no snapshot (ms)", round(medians["snapshot"] - medians["none"], 2))
        report("snapshot pause seen by the client, against one FLUSH (ms)", round(medians["snapshot"] - medians["flush"], 2))
        report("writes held by the engine per snapshot (ms, each)", [round(h, 1) for h in held[-3:]])
    flat.remove()

    # 4. A chain of many snapshots, small writes between them.
    if "chain" not in parts:
        return layered.remove()
    print(f"snapshots: a chain of {args.many}", flush=True)
    import nbd
    started = time.time()
    with layered:
        handle = nbd.NBD()
        handle.connect_uri(layered.uri)
        rng = random.Random(1000)
        blocks = parse_size(args.size) // 4096
        while layered.snapshots < args.many:
            for _ in range(32):
                handle.pwrite(rng.randbytes(4096), rng.randrange(blocks) * 4096)
            layered.snapshot()
        handle.shutdown()
        report(f"seconds to take {args.many} snapshots (with 32 writes each)", round(time.time() - started, 1))
        drop_caches()
        report(f"randread QD32, {layered.snapshots} snapshots (IOPS)",
               round(fio(layered.uri, "randread", 32, args.runtime, args.size)["iops"]))
    layered.remove()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
