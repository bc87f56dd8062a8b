#!/usr/bin/env python3
"""Keel's backup benchmark, in one run on this host (release build, a volume of random
data on 3 loopback replicas, the store on the same disk):

1. A full backup of a snapshot to a directory target, against `nbdcopy --flush` of the
   same snapshot's export (`keel snapshot export`) into a file in the same directory
   (goal: at least 0.8 x its rate). --flush: a backup is on disk when it is listed, so the
   copy it is held against is made durable too.
2. A restore of that backup into a fresh 3-replica volume (through its engine), against
   `nbdcopy --flush` of the raw image into another fresh 3-replica volume (goal: at least
   0.8 x); the restore ends with a FLUSH too.
3. An incremental backup after 1 % of the volume changed in 2 MiB-aligned extents: the
   bytes it reads and sends (goal: about 1 %).
4. The full backup and the restore again with the S3 server (SeaweedFS) as the target.

Each with MiB/s and the CPU-seconds per GiB of the client processes (keel backup, or
nbdcopy with the export it reads).

Before each timed run the files under the work directory (replicas, store, image) are written back
and evicted from the page cache, so that data is read from disk; the programs stay loaded (dropping
every cache, --drop-all-caches, also makes each run load keel's 120 MB binary and Swift's libraries
from disk again, about 0.1 s of a 1.2 s backup, where nbdcopy is 0.2 MB and its export server runs
already).

This host's page-cache writes cost what the hypervisor's first touch of memory costs, which
varies run to run: each pair is measured --rounds times in turn (5 by default) and the medians
are reported, with every round's figures.

Usage: Bench/backups [--size 1G] [--dir DIR] [--no-s3] [--rounds 5] [--drop-all-caches] [--json FILE]
"""
import argparse, json, os, random, resource, shutil, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import REPO, Cluster, Server, cpu_seconds, drop_caches  # noqa: E402

S3_ACCESS, S3_SECRET = "KEELTESTACCESSKEY", "keel-test-secret-key-0123456789"


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def timed(argv, env=None, extra_pids=()):
    """Runs argv; returns (seconds, CPU-seconds of it and its children, plus of extra_pids), stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    extra_before = sum(cpu_seconds(p) for p in extra_pids)
    started = time.time()
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
    seconds = time.time() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cpu += sum(cpu_seconds(p) for p in extra_pids) - extra_before
    return seconds, cpu, out


def evict(directory):
    """Writes everything back, then evicts every file under `directory` from the page cache."""
    os.sync()
    for parent, _, files in os.walk(directory):
        for name in files:
            try:
                fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            except OSError:
                continue  # a socket, or gone meanwhile
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def median(pairs):
    """The (seconds, CPU-seconds) of the round with the median time."""
    return sorted(pairs)[len(pairs) // 2]


def median_ratio(peers, ours):
    """The median of the rounds' rate ratios (ours / the peer's): each round's pair ran back to back."""
    ratios = sorted(p[0] / o[0] for p, o in zip(peers, ours))
    return round(ratios[len(ratios) // 2], 3)


def last_json(out):
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def stop_s3_server(directory):
    """SIGTERM, 15 s to go, then SIGKILL (weed can take long to stop)."""
    with open(os.path.join(directory, "weed.pid")) as f:
        pid = int(f.read())
    os.kill(pid, 15)
    for _ in range(150):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default=os.environ.get("KEEL_BENCH_DIR", "/var/tmp/keel-bench"))
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 measures")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--rounds", type=int, default=5, help="peer and keel measured in turn this many times; medians reported")
    ap.add_argument("--drop-all-caches", action="store_true", help="drop every cache before a timed run, programs included")
    args = ap.parse_args()
    subprocess.run(["swift", "build", "-c", "release", "--product", "keel"], cwd=REPO, check=True)
    keel = os.path.join(REPO, ".build", "release", "keel")
    size = parse_size(args.size)
    gib = size / (1 << 30)
    work = os.path.join(args.dir, "backups")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    results = {"caches": "all dropped" if args.drop_all_caches else "the work directory's files evicted"}

    def cold():
        drop_caches() if args.drop_all_caches else evict(work)

    def report(label, value):
        results[label] = value
        print(f"  {label}: {value}", flush=True)

    def rate(seconds):
        return round(size / (1 << 20) / seconds, 1)

    image = os.path.join(work, "random.img")
    subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=1M", f"count={size >> 20}", "status=none"], check=True)

    def volume(name):
        sock = os.path.join(work, f"{name}.sock")
        control = "unix:" + os.path.join(work, f"{name}.control")
        cluster = Cluster(keel, work, name, 3, args.size, sock, None, engine_extra=["--control", control])
        return cluster, f"nbd+unix:///bench?socket={sock}", control

    source, source_uri, control = volume("source")
    with source:
        subprocess.run(["nbdcopy", image, source_uri], check=True)
        subprocess.run([keel, "snapshot", "create", "bench", "s1", "--engine", control], check=True, stdout=subprocess.DEVNULL)

        # 1. Full backup against nbdcopy of the same snapshot's export.
        print("backups: full backup of a snapshot, and nbdcopy of its export", flush=True)
        export_sock = os.path.join(work, "export.sock")
        copies, backups = [], []
        for round_ in range(args.rounds):
            with Server("export", [keel, "snapshot", "export", "bench", "s1", "--listen", f"unix:{export_sock}",
                                   "--engine", control], export_sock) as export:
                cold()
                copies.append(timed(["nbdcopy", "--flush", f"nbd+unix:///s1?socket={export_sock}", os.path.join(work, "copy.img")],
                                    extra_pids=export.pids())[:2])
            os.unlink(os.path.join(work, "copy.img"))
            store = os.path.join(work, "store")
            shutil.rmtree(store, ignore_errors=True)
            os.makedirs(store)
            cold()
            backup_s, backup_cpu, out = timed([keel, "backup", "create", "bench", "--target", f"file://{store}", "--snapshot", "s1",
                                               "--engine", control, "--json"])
            backups.append((backup_s, backup_cpu))
            full = last_json(out)
            print(f"  round {round_ + 1}: nbdcopy {rate(copies[-1][0])} MiB/s, backup {rate(backup_s)} MiB/s, "
                  f"ratio {round(copies[-1][0] / backup_s, 3)}", flush=True)
        copy_s, copy_cpu = median(copies)
        backup_s, backup_cpu = median(backups)
        report("nbdcopy --flush of the snapshot export to a file (MiB/s, CPU-s/GiB; median)", (rate(copy_s), round(copy_cpu / gib, 1)))
        report("full backup to a directory (MiB/s, CPU-s/GiB; median)", (rate(backup_s), round(backup_cpu / gib, 1)))
        report("full backup / nbdcopy (rate; median of the rounds)", median_ratio(copies, backups))
        report("full backup: bytes read, bytes sent (MiB)", (full["bytes_read"] >> 20, full["bytes_sent"] >> 20))

        # 3. An incremental after 1 % changed in 2 MiB-aligned extents.
        rng = random.Random(1401)
        blocks = size // (2 << 20)
        changed = rng.sample(range(blocks), max(1, blocks // 100))
        import nbd
        handle = nbd.NBD()
        handle.connect_uri(source_uri)
        for block in changed:
            handle.pwrite(rng.randbytes(2 << 20), block * (2 << 20))
        handle.shutdown()
        print(f"backups: incremental after {len(changed)} of {blocks} 2 MiB extents changed", flush=True)
        inc_s, inc_cpu, out = timed([keel, "backup", "create", "bench", "--target", f"file://{store}", "--engine", control, "--json"])
        incremental = last_json(out)
        report("incremental backup: seconds, bytes read, bytes sent (MiB), share of the volume read",
               (round(inc_s, 2), incremental["bytes_read"] >> 20, incremental["bytes_sent"] >> 20,
                round(incremental["bytes_read"] / size, 4)))
        assert incremental["incremental"], incremental

        # 4a. The full backup to S3.
        s3_env = None
        if not args.no_s3:
            s3_dir = os.path.join(work, "s3")
            endpoint = subprocess.run(["bash", os.path.join(REPO, "scripts", "s3-test-server"), s3_dir, "--parent", str(os.getpid()),
                                       "--bucket", "bench", "--volume-max", str(max(16, 4 * int(gib) * 16))],
                                      check=True, capture_output=True, text=True).stdout.strip()
            s3_env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_ACCESS, AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_REGION="us-east-1",
                          AWS_ENDPOINT_URL=endpoint)
            cold()
            s3_s, s3_cpu, out = timed([keel, "backup", "create", "bench", "--target", "s3://bench/keel", "--snapshot", "s1",
                                       "--engine", control, "--json"], env=s3_env)
            s3_full = last_json(out)
            report("full backup to S3 (SeaweedFS) (MiB/s, CPU-s/GiB of keel)", (rate(s3_s), round(s3_cpu / gib, 1)))

    # 2. Restore into a fresh volume against nbdcopy of the raw image into another.
    print("backups: restore into a fresh 3-replica volume, and nbdcopy of the image into another", flush=True)
    peers, restores = [], []
    for round_ in range(args.rounds):
        peer, peer_uri, _ = volume("peer")
        with peer:
            cold()
            peers.append(timed(["nbdcopy", "--flush", image, peer_uri])[:2])
        peer.remove()
        restored, restored_uri, _ = volume("restored")
        with restored:
            cold()
            restores.append(timed([keel, "backup", "restore", full["id"], "--target", f"file://{store}", "--to", restored_uri])[:2])
            subprocess.run(["nbdcopy", restored_uri, os.path.join(work, "check.img")], check=True)
            assert subprocess.run(["cmp", "-s", image, os.path.join(work, "check.img")]).returncode == 0, "the restore differs"
            os.unlink(os.path.join(work, "check.img"))
        restored.remove()
        print(f"  round {round_ + 1}: nbdcopy {rate(peers[-1][0])} MiB/s, restore {rate(restores[-1][0])} MiB/s, "
              f"ratio {round(peers[-1][0] / restores[-1][0], 3)}", flush=True)
    peer_s, peer_cpu = median(peers)
    restore_s, restore_cpu = median(restores)
    report("nbdcopy --flush of the image into a fresh 3-replica volume (MiB/s, CPU-s/GiB; median)", (rate(peer_s), round(peer_cpu / gib, 1)))
    report("restore into a fresh 3-replica volume (MiB/s, CPU-s/GiB; median)", (rate(restore_s), round(restore_cpu / gib, 1)))
    report("restore / nbdcopy (rate; median of the rounds)", median_ratio(peers, restores))

    # 4b. The restore from S3.
    if s3_env:
        restored, restored_uri, _ = volume("restored-s3")
        with restored:
            cold()
            r_s, r_cpu, _ = timed([keel, "backup", "restore", s3_full["id"], "--target", "s3://bench/keel", "--to", restored_uri],
                                  env=s3_env)
        restored.remove()
        report("restore from S3 into a fresh 3-replica volume (MiB/s, CPU-s/GiB of keel)", (rate(r_s), round(r_cpu / gib, 1)))
        stop_s3_server(s3_dir)

    source.remove()
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
