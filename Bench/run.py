#!/usr/bin/env python3
"""Keel's export benchmark: one run, one backing file, the same fio jobs
against raw io_uring (the limit), nbdkit file, qemu-nbd and `keel export`.

Usage: Bench/run [--size 1G] [--runtime 8] [--rounds 1] [--dir DIR] [--only keel,raw] [--jobs LABELS]
       Bench/run --only engine-3-tcp,engine-3-tls --jobs '4k randwrite QD32,1M write QD8'   (TLS's cost)
       Bench/run --only engine-3,engine-3-remote   (the engine on another node: a namespace over veth TCP)
                 [--base REV] [--json FILE]
Prints one table per job with IOPS, MiB/s, mean latency, the servers' CPU
time per request, and each server's ratio to raw and to the better of nbdkit
and qemu-nbd. With --base REV, REV is built into .build-base and its engines
(base-engine-1, base-engine-3) run in the same rounds as this build's, so a
change is compared with what came before on the same machine, interleaved.
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


# engine-3-remote: the engine's node, a network namespace linked to this one by a veth pair.
REMOTE_NODE, REMOTE_HOST, REMOTE_ADDRESS, REMOTE_PORT = "keel-bench-engine", "10.79.0.1", "10.79.0.2", 10809


def make_remote_node():
    remove_remote_node()
    for argv in (["ip", "netns", "add", REMOTE_NODE],
                 ["ip", "link", "add", "kb-engine", "type", "veth", "peer", "name", "eth0", "netns", REMOTE_NODE],
                 ["ip", "addr", "add", f"{REMOTE_HOST}/24", "dev", "kb-engine"],
                 ["ip", "link", "set", "kb-engine", "up"],
                 ["ip", "-n", REMOTE_NODE, "addr", "add", f"{REMOTE_ADDRESS}/24", "dev", "eth0"],
                 ["ip", "-n", REMOTE_NODE, "link", "set", "eth0", "up"],
                 ["ip", "-n", REMOTE_NODE, "link", "set", "lo", "up"]):
        subprocess.run(argv, check=True)


def remove_remote_node():
    subprocess.run(["ip", "netns", "del", REMOTE_NODE], stderr=subprocess.DEVNULL)


def wait_for_tcp(port, proc, timeout=20, host="127.0.0.1"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.args}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {host}:{port}")


def free_port():
    """Two free consecutive ports on 127.0.0.1 (a replica's data port and its control port, data + 1)."""
    for _ in range(100):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        try:
            t = socket.socket()
            t.bind(("127.0.0.1", port + 1))
            t.close()
            return port
        except OSError:
            continue
    raise RuntimeError("no two free consecutive ports")


def cpu_seconds(pid):
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


class Server:
    def __init__(self, name, argv, sock):
        self.name, self.argv, self.sock = name, argv, sock

    def pids(self):
        return [self.proc.pid]

    def __enter__(self):
        if isinstance(self.sock, str) and os.path.exists(self.sock):
            os.unlink(self.sock)
        # A file, not a pipe: a server that logs more than a pipe holds would block on it.
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self.log)
        if isinstance(self.sock, tuple):
            wait_for_tcp(self.sock[1], self.proc, host=self.sock[0])
        elif isinstance(self.sock, int):
            wait_for_tcp(self.sock, self.proc)
        else:
            wait_for_socket(self.sock, self.proc)
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Cluster:
    """N `keel replica serve`, then `keel engine serve` in front. Each
    replica's head starts as a copy of the benchmark image, so that reads and
    writes meet allocated blocks, as on the other targets. The links are unix
    sockets, or with `link` "tcp" loopback TCP, or "tls" loopback TCP with TLS
    (`--tls require`, the cluster CA's certificates in `credentials`). With
    "remote" the links are unix sockets and the engine runs on another node
    (REMOTE_NODE), its clients reaching it over veth TCP."""

    def __init__(self, keel, workdir, name, replicas, size, sock, image, engine_extra=(), link="unix",
                 credentials=None):
        self.keel, self.count, self.size, self.sock = keel, replicas, size, sock
        self.engine_extra = list(engine_extra)
        self.link, self.credentials = link, credentials
        self.dirs = [os.path.join(workdir, f"{name}-replica{i}") for i in range(replicas)]
        self.socks = [os.path.join(os.path.dirname(sock), f"{name}-replica{i}.sock") for i in range(replicas)]
        for d, rsock in zip(self.dirs, self.socks):
            shutil.rmtree(d, ignore_errors=True)
            with self._replica(d, rsock):
                pass
            if image:
                subprocess.run(["dd", f"if={image}", f"of={d}/layers/head.img", "bs=1M", "conv=notrunc",
                                "oflag=direct", "status=none"], check=True)

    def _replica(self, d, rsock, port=None, tls=()):
        address = f"127.0.0.1:{port}" if port else f"unix:{rsock}"
        return Server("replica", [self.keel, "replica", "serve", "--dir", d, "--listen", address,
                                  "--size", self.size] + list(tls), port or rsock)

    def __call__(self):
        return self

    def __enter__(self):
        engine_tls = []
        if self.link in ("unix", "remote"):
            self.servers = [self._replica(d, rsock).__enter__() for d, rsock in zip(self.dirs, self.socks)]
            addresses = [a for rsock in self.socks for a in ("--replica", f"unix:{rsock}")]
        else:
            tls = ["--tls", "require", "--tls-certificates", self.credentials] if self.link == "tls" else []
            if tls:
                engine_tls = ["--replica-tls", "require", "--tls-certificates", self.credentials]
            ports = []
            self.servers = []
            for d, rsock in zip(self.dirs, self.socks):
                ports.append(free_port())
                self.servers.append(self._replica(d, rsock, ports[-1], tls).__enter__())
            addresses = [a for port in ports for a in ("--replica", f"127.0.0.1:{port}")]
        if self.link == "remote":
            engine = Server("engine", ["ip", "netns", "exec", REMOTE_NODE, self.keel, "engine", "serve", "--volume",
                                       "bench", "--size", self.size, "--listen", f"{REMOTE_ADDRESS}:{REMOTE_PORT}",
                                       "--tls", "off"] + addresses + self.engine_extra,
                            (REMOTE_ADDRESS, REMOTE_PORT))
        else:
            engine = Server("engine", [self.keel, "engine", "serve", "--volume", "bench", "--size", self.size,
                                       "--listen", f"unix:{self.sock}"] + addresses + engine_tls + self.engine_extra,
                            self.sock)
        self.servers.append(engine.__enter__())
        return self

    def __exit__(self, *exc):
        for server in reversed(self.servers):
            server.__exit__(None, None, None)

    def pids(self):
        return [server.proc.pid for server in self.servers]

    def remove(self):
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


def drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def fio(target_args, rw, bs, depth, runtime, size, pids=()):
    """One fio job; with the servers' pids, also their CPU time per request."""
    argv = ["fio", "--output-format=json", "--name=job", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", f"--runtime={runtime}", "--time_based", "--ramp_time=2",
            "--randrepeat=0", "--norandommap", f"--size={size}"] + target_args
    before = sum(cpu_seconds(p) for p in pids)
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    cpu = sum(cpu_seconds(p) for p in pids) - before
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if rw.endswith("read") else job["write"]
    # The ramp is not counted in total_ios, but its CPU is: scale by the whole run's requests.
    requests = side["total_ios"] * (runtime + 2) / runtime
    return {"iops": side["iops"], "mibs": side["bw_bytes"] / 2**20, "lat_us": side["lat_ns"]["mean"] / 1000,
            "cpu_us": cpu * 1e6 / requests if pids and requests else float("nan")}


def build_base(rev):
    """REV's keel, built in .build-base (sources from git, build folder beside them)."""
    base = os.path.join(REPO, ".build-base")
    src = os.path.join(base, "src")
    commit = subprocess.run(["git", "rev-parse", rev], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.strip()
    stamp = os.path.join(base, "commit")
    if not (os.path.exists(stamp) and open(stamp).read() == commit):
        shutil.rmtree(src, ignore_errors=True)
        os.makedirs(src)
        archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        with open(stamp, "w") as f:
            f.write(commit)
    print(f"bench: building the base {rev} ({commit[:10]}) in {base}", flush=True)
    subprocess.run(["swift", "build", "-c", "release", "--product", "keel", "--package-path", src,
                    "--scratch-path", os.path.join(base, "build")], check=True)
    return os.path.join(base, "build", "release", "keel")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=int, default=8, help="seconds per job and target")
    ap.add_argument("--dir", default=os.environ.get("KEEL_BENCH_DIR", "/var/tmp/keel-bench"),
                    help="where the backing file lives (must be a real disk, not tmpfs)")
    ap.add_argument("--only", default="raw,nbdkit,qemu-nbd,keel",
                    help="targets, comma-separated: raw, nbdkit, qemu-nbd, keel, engine-1, engine-3, "
                         "engine-3-tcp and engine-3-tls (replicas over loopback TCP, without and with TLS), "
                         "engine-3-remote (the engine in a network namespace, reached over veth TCP)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every job; report the median")
    ap.add_argument("--jobs", help="only these jobs, comma-separated labels, e.g. '4k randwrite QD32'")
    ap.add_argument("--base", help="also run engine-1 and engine-3 of this git revision (built into .build-base)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    jobs = [j for j in JOBS if not args.jobs or j[0] in args.jobs.split(",")]

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
        # The engine with 1 and 3 replicas, all on this disk (3 replicas write 3x).
    }
    only = args.only.split(",")
    base_keel = build_base(args.base) if args.base else None
    if base_keel:
        only += [f"base-{t}" for t in only if t.startswith("engine-")]
    order = ["raw", "nbdkit", "qemu-nbd", "keel", "base-engine-1", "engine-1", "base-engine-3", "engine-3",
             "engine-3-tcp", "engine-3-tls", "engine-3-remote"]
    chosen = [t for t in order if t in only]
    credentials = None
    if "engine-3-tls" in chosen:
        state = tempfile.mkdtemp(prefix="keel-bench-ca-")
        subprocess.run([keel, "ca", "init", "--state-dir", state], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([keel, "cert", "issue", "bench", "--ip", "127.0.0.1", "--state-dir", state], check=True,
                       stdout=subprocess.DEVNULL)
        credentials = os.path.join(state, "tls", "bench")
    if "engine-3-remote" in chosen:
        make_remote_node()
    for name in chosen:
        if "engine-" in name:
            replicas = int(name.split("-")[-1] if name[-1].isdigit() else name.split("-")[-2])
            link = name.split("-")[-1] if not name[-1].isdigit() else "unix"
            print(f"bench: preparing {name}", flush=True)
            target_uri = f"nbd://{REMOTE_ADDRESS}:{REMOTE_PORT}/bench" if link == "remote" else uri
            targets[name] = (Cluster(base_keel if name.startswith("base-") else keel, args.dir, name, replicas,
                                     args.size, sock, image, link=link, credentials=credentials),
                             ["--ioengine=nbd", f"--uri={target_uri}"])
    # Job-major order, every target in turn, so that drift of the disk over
    # the run affects all targets of a job alike; --rounds repeats and keeps the median.
    samples = {job[0]: {name: [] for name in chosen} for job in jobs}
    for round_ in range(args.rounds):
        for label, rw, bs, depth in jobs:
            for name in chosen:
                server_argv, fio_args = targets[name]
                print(f"bench: round {round_ + 1}: {label}: {name}", flush=True)
                drop_caches()
                if isinstance(server_argv, Cluster):
                    with server_argv as cluster:
                        samples[label][name].append(fio(fio_args, rw, bs, depth, args.runtime, args.size,
                                                        cluster.pids()))
                elif server_argv:
                    with Server(name, server_argv, sock) as server:
                        samples[label][name].append(fio(fio_args, rw, bs, depth, args.runtime, args.size,
                                                        server.pids()))
                else:
                    samples[label][name].append(fio(fio_args, rw, bs, depth, args.runtime, args.size))
    for name in chosen:
        if isinstance(targets[name][0], Cluster):
            targets[name][0].remove()
    if "engine-3-remote" in chosen:
        remove_remote_node()
    def median(runs, key):
        return sorted(r[key] for r in runs)[len(runs) // 2]

    results = {label: {name: {key: median(runs, key) for key in runs[0]} for name, runs in by_target.items()}
               for label, by_target in samples.items()}

    print()
    for label, *_ in jobs:
        row = results[label]
        peers = [row[p]["iops"] for p in ("nbdkit", "qemu-nbd") if p in row]
        best_peer = max(peers) if peers else None
        print(f"{label}")
        print(f"  {'target':<14} {'IOPS':>10} {'MiB/s':>9} {'lat us':>9} {'CPU us/req':>11} {'x raw':>7} {'x best peer':>12}")
        for name in chosen:
            r = row[name]
            to_raw = r["iops"] / row["raw"]["iops"] if "raw" in row else float("nan")
            to_peer = r["iops"] / best_peer if best_peer else float("nan")
            extra = ""
            if "engine-" in name and "keel" in row:
                extra += f" {r['iops'] / row['keel']['iops']:>7.2f} x keel"
            if name == "engine-3" and "engine-1" in row:
                extra += f" {r['iops'] / row['engine-1']['iops']:>7.2f} x engine-1"
            if name == "engine-3-remote" and "engine-3" in row:
                t = row["engine-3"]
                extra += f"   vs engine-3: IOPS {r['iops'] / t['iops']:.3f}x, CPU/req {r['cpu_us'] / t['cpu_us']:.3f}x"
            if name == "engine-3-tls" and "engine-3-tcp" in row:
                t = row["engine-3-tcp"]
                extra += f"   vs engine-3-tcp: IOPS {r['iops'] / t['iops']:.3f}x, CPU/req {r['cpu_us'] / t['cpu_us']:.3f}x"
            if f"base-{name}" in row:
                b = row[f"base-{name}"]
                extra += (f"   vs base: IOPS {r['iops'] / b['iops']:.3f}x, CPU/req {r['cpu_us'] / b['cpu_us']:.3f}x")
            print(f"  {name:<14} {r['iops']:>10.0f} {r['mibs']:>9.1f} {r['lat_us']:>9.1f} {r['cpu_us']:>11.1f} "
                  f"{to_raw:>7.2f} {to_peer:>12.2f}{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
