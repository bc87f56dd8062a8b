#!/usr/bin/env python3
"""Keel's export benchmark: one run, one backing file, the same fio jobs
against raw io_uring (the limit), nbdkit file, qemu-nbd and `keel export`.

Usage: Bench/run [--size 1G] [--runtime 8] [--rounds 1] [--dir DIR] [--only keel,raw] [--json FILE]
Prints one table per job with IOPS, MiB/s, mean latency and each server's
ratio to raw and to the better of nbdkit and qemu-nbd.
"""
import argparse, json, os, shutil, signal, socket, subprocess, sys, tempfile, time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOBS = [
    # name, rw, bs, iodepth
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("4k randread QD1", "randread", "4k", 1),
    ("1M read QD8", "read", "1M", 8),
    ("1M write QD8", "write", "1M", 8),
]


def wait_for_socket(path, proc, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.args}")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {path}")


class Server:
    def __init__(self, name, argv, sock):
        self.name, self.argv, self.sock = name, argv, sock

    def __enter__(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_socket(self.sock, self.proc)
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def fio(target_args, rw, bs, depth, runtime, size):
    argv = ["fio", "--output-format=json", "--name=job", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", f"--runtime={runtime}", "--time_based", "--ramp_time=2",
            "--randrepeat=0", "--norandommap", f"--size={size}"] + target_args
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if rw.endswith("read") else job["write"]
    return {"iops": side["iops"], "mibs": side["bw_bytes"] / 2**20, "lat_us": side["lat_ns"]["mean"] / 1000}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=int, default=8, help="seconds per job and target")
    ap.add_argument("--dir", default=os.environ.get("KEEL_BENCH_DIR", "/var/tmp/keel-bench"),
                    help="where the backing file lives (must be a real disk, not tmpfs)")
    ap.add_argument("--only", default="raw,nbdkit,qemu-nbd,keel")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every job; report the median")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    subprocess.run(["swift", "build", "-c", "release", "--product", "keel"], cwd=REPO, check=True)
    keel = os.path.join(REPO, ".build", "release", "keel")

    os.makedirs(args.dir, exist_ok=True)
    fstype = subprocess.run(["stat", "-f", "-c", "%T", args.dir], capture_output=True, text=True).stdout.strip()
    if fstype in ("tmpfs", "ramfs"):
        sys.exit(f"bench: {args.dir} is {fstype}; pass --dir on a real disk")
    image = os.path.join(args.dir, "bench.img")
    sock = os.path.join(tempfile.mkdtemp(prefix="keel-bench-"), "nbd.sock")
    uri = f"nbd+unix:///?socket={sock}"
    print(f"bench: preparing {args.size} at {image} ({fstype})", flush=True)
    if os.path.exists(image):
        os.unlink(image)
    subprocess.run(["fio", "--name=fill", f"--filename={image}", f"--size={args.size}", "--rw=write",
                    "--bs=1M", "--direct=1", "--ioengine=io_uring", "--iodepth=8", "--output=/dev/null"], check=True)

    targets = {
        "raw": (None, ["--ioengine=io_uring", "--direct=1", f"--filename={image}"]),
        "nbdkit": (["nbdkit", "-f", "-U", sock, "file", f"file={image}", "cache=none"],
                   ["--ioengine=nbd", f"--uri={uri}"]),
        "qemu-nbd": (["qemu-nbd", "-f", "raw", "--aio=io_uring", "--cache=none", "-k", sock, "-t", image],
                     ["--ioengine=nbd", f"--uri={uri}"]),
        "keel": ([keel, "export", image, "--listen", f"unix:{sock}"], ["--ioengine=nbd", f"--uri={uri}"]),
    }
    chosen = [t for t in targets if t in args.only.split(",")]
    # Job-major order, every target in turn, so that drift of the disk over
    # the run affects all targets of a job alike; --rounds repeats and keeps the median.
    samples = {job[0]: {name: [] for name in chosen} for job in JOBS}
    for round_ in range(args.rounds):
        for label, rw, bs, depth in JOBS:
            for name in chosen:
                server_argv, fio_args = targets[name]
                print(f"bench: round {round_ + 1}: {label}: {name}", flush=True)
                drop_caches()
                if server_argv:
                    with Server(name, server_argv, sock):
                        samples[label][name].append(fio(fio_args, rw, bs, depth, args.runtime, args.size))
                else:
                    samples[label][name].append(fio(fio_args, rw, bs, depth, args.runtime, args.size))
    results = {label: {name: sorted(runs, key=lambda r: r["iops"])[len(runs) // 2]
                       for name, runs in by_target.items()} for label, by_target in samples.items()}

    print()
    for label, *_ in JOBS:
        row = results[label]
        peers = [row[p]["iops"] for p in ("nbdkit", "qemu-nbd") if p in row]
        best_peer = max(peers) if peers else None
        print(f"{label}")
        print(f"  {'target':<10} {'IOPS':>10} {'MiB/s':>9} {'lat us':>9} {'x raw':>7} {'x best peer':>12}")
        for name in chosen:
            r = row[name]
            to_raw = r["iops"] / row["raw"]["iops"] if "raw" in row else float("nan")
            to_peer = r["iops"] / best_peer if best_peer else float("nan")
            print(f"  {name:<10} {r['iops']:>10.0f} {r['mibs']:>9.1f} {r['lat_us']:>9.1f} {to_raw:>7.2f} {to_peer:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
