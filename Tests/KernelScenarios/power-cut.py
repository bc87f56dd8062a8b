#!/usr/bin/python3
"""A real power cut under a Keel volume.

Killing QEMU is not a power cut: whatever QEMU wrote sits in the host's page
cache and survives. Here the guest's disk (/dev/vda, an ext4 filesystem that
holds the volume's three replicas) is served by a host nbdkit with the cache
filter in writeback mode: a write reaches the backing file only when the guest
sends FLUSH (or FUA). The guest (Tests/KernelScenarios/power-cut.sh) runs the
replicas and an engine and writes stamped blocks through the engine
(Tests/Tools/stamp.py, a FLUSH every few writes), logging every issue, answer
and FLUSH to the run directory, a host share that is not the disk being cut.
After a random delay (seeded, printed) the host kills QEMU and nbdkit with
SIGKILL: the writes nbdkit held unflushed are gone, as in a power cut. The next
boot (a new nbdkit on the same backing file) mounts the disk, starts the volume
(the engine makes its replicas identical where writes were in flight), checks
that every write acknowledged before an acknowledged FLUSH, or with FUA,
survived (`stamp.py check --durable`) and that the three replicas are
identical, then writes on until the next cut. One disk and one stamp log serve
every cut; a last boot checks the last cut and stops cleanly.

  power-cut.py [--keel PATH] [--cuts 5] [--seed N] [--keep]
  power-cut.py --control [--cuts 3]    the replicas skip their fdatasync
                                       (KEEL_REPLICA_FAULTS=skip-fdatasync):
                                       a cut must lose flushed writes

Last line: `power-cut: cuts 5, flushed writes checked N, lost 0, corrupt 0,
diverged 0, ...` (exit 0), or with --control `power-cut control: lost N ...`
(exit 0 once a check found lost writes).
"""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "scripts", "kernel-vm"))
sys.dont_write_bytecode = True  # no __pycache__ in the repository
import vm  # noqa: E402

SCENARIO = os.path.join(REPO, "Tests", "KernelScenarios", "power-cut.sh")


def say(text):
    print(text, flush=True)


class Failed(Exception):
    pass


class Nbdkit:
    """nbdkit --filter=cache file BACKING cache=writeback on a unix socket."""

    def __init__(self, scratch, backing):
        self.socket = os.path.join(scratch, "nbd.sock")
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.log = os.path.join(scratch, "nbdkit.log")
        # The cache filter keeps its (unlinked) cache file in TMPDIR.
        self.process = subprocess.Popen(
            ["nbdkit", "--foreground", "--exit-with-parent", "--unix", self.socket, "--filter=cache",
             "file", "file=" + backing, "cache=writeback"],
            stdin=subprocess.DEVNULL, stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
            env=dict(os.environ, TMPDIR=scratch))
        for _ in range(200):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.socket)
                s.close()
                return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        raise Failed("nbdkit did not start: " + open(self.log).read()[-2000:])

    @property
    def uri(self):
        return "nbd+unix:///?socket=" + self.socket

    def freeze(self):
        self.process.send_signal(signal.SIGSTOP)

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


class LogWatch:
    """Follows the stamp log as it grows (reading only what is new): the writer sessions
    (S lines) and the FLUSHes answered with success (G lines) of the newest one."""

    def __init__(self, path):
        self.path, self.offset, self.partial = path, 0, b""
        self.sessions = self.flushed = 0

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line.startswith(b"S "):
                self.sessions += 1
                self.flushed = 0
            elif line.startswith(b"G ") and line.endswith(b" 0"):
                self.flushed += 1


def read_json(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (FileNotFoundError, ValueError):
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keel", default=os.path.join(REPO, ".build", "debug", "keel"))
    p.add_argument("--cuts", type=int, default=None, help="power cuts (default 5; 3 with --control)")
    p.add_argument("--seed", type=int, help="seeds the cut delays (default: random, printed)")
    p.add_argument("--control", action="store_true",
                   help="negative control: the replicas skip fdatasync; passes once a cut lost flushed writes")
    p.add_argument("--size", default="32M", help="the volume's size")
    p.add_argument("--stamp-range", default="2M",
                   help="bytes written and checked, from 8 MiB on: two 1 MiB regions (under TCG a debug engine "
                        "takes seconds to mark one dirty, and a region left idle for 3 s is cleared, which "
                        "flushes the disk)")
    p.add_argument("--disk-size", default="256M", help="the guest disk that holds the three replicas")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--flush-every", type=int, default=16, help="the writer's FLUSH interval, in writes")
    p.add_argument("--flushes", type=int,
                   help="FLUSHes the writer must have had answered before the delay to the cut starts (default 1; "
                        "3 with --control: the first writes of a volume are slow, and the clears of regions "
                        "left idle meanwhile flush the disk)")
    p.add_argument("--min-delay", type=float,
                   help="seconds from those FLUSH answers to the cut, at least (default 0; 3 with --control)")
    p.add_argument("--max-delay", type=float, default=5.0, help="seconds from those FLUSH answers to the cut, at most")
    p.add_argument("--boot-timeout", type=float, default=300, help="seconds a boot may take to start writing")
    p.add_argument("--flush-timeout", type=float, default=60,
                   help="seconds to wait for those FLUSH answers; then the power is cut anyway")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args()
    # A test runner's SIGTERM (its time limit) unwinds through the cleanup below, which kills
    # the guest (nbdkit dies with us by itself: --exit-with-parent).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cuts = args.cuts if args.cuts is not None else (3 if args.control else 5)
    if args.min_delay is None:
        args.min_delay = 3.0 if args.control else 0.0
    if args.flushes is None:
        args.flushes = 3 if args.control else 1
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    if not os.access(args.keel, os.X_OK):
        sys.exit("power-cut: no keel binary at " + args.keel)
    if not shutil.which("nbdkit"):
        sys.exit("power-cut: nbdkit is needed (apt-get install nbdkit)")
    size = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

    def parse_size(text):
        return int(text[:-1]) * size[text[-1].upper()] if text[-1].isalpha() else int(text)

    volume, stamp_range, offset = parse_size(args.size), parse_size(args.stamp_range), 8 << 20
    if offset + stamp_range > volume:
        offset = 0
    if stamp_range > volume:
        sys.exit("power-cut: --stamp-range is larger than the volume")
    scratch = tempfile.mkdtemp(prefix="keel-power-cut-", dir="/var/tmp")
    os.chmod(scratch, 0o755)
    run_dir = os.path.join(scratch, "run")  # the guest's results share, kept across boots
    os.makedirs(run_dir)
    backing = os.path.join(scratch, "disk.img")
    with open(backing, "wb") as f:
        f.truncate(parse_size(args.disk_size))
    with open(os.path.join(run_dir, "power-cut.env"), "w") as f:
        f.write(f"SIZE={args.size}\nBLOCKS={stamp_range // 4096}\nOFFSET={offset}\nDEPTH={args.depth}\n"
                f"FLUSH_EVERY={args.flush_every}\n"
                f"WRITE_SECONDS=120\nFAULTS={'skip-fdatasync' if args.control else ''}\n")
    label = "power-cut control" if args.control else "power-cut"
    say(f"{label}: seed {seed}, {cuts} cut(s), volume {args.size} (stamped: {args.stamp_range} at {offset >> 20}M), "
        f"a FLUSH every {args.flush_every} writes, disk {args.disk_size} in {scratch}"
        + (", replicas without fdatasync (KEEL_REPLICA_FAULTS=skip-fdatasync)" if args.control else ""))
    log = os.path.join(run_dir, "stamp.log")
    started = time.monotonic()
    checked = lost = corrupt = diverged = 0
    guest = nbdkit = None
    ok = False
    watch = LogWatch(log)
    timings = []
    try:
        for boot in range(1, cuts + 2):
            phase = "first" if boot == 1 else ("last" if boot == cuts + 1 else "again")
            prefix = os.path.join(run_dir, f"boot{boot}")
            out_path = prefix + "-guest.out"
            t0 = time.monotonic()
            nbdkit = Nbdkit(scratch, backing)
            watch.poll()
            before = watch.sessions
            with open(out_path, "w") as out:
                guest = vm.start(["sh", SCENARIO, args.keel, phase, str(boot)], disks=[nbdkit.uri],
                                 run_dir=run_dir, stdout=out)
            delay = rng.uniform(args.min_delay, args.max_delay) if phase != "last" else None
            t_checked = t_writing = t_flushed = None
            cut = False
            while True:
                now = time.monotonic()
                if t_checked is None and os.path.exists(prefix + "-checked"):
                    t_checked = now
                watch.poll()
                if t_writing is None and watch.sessions > before:
                    t_writing = now
                if t_writing is not None and t_flushed is None and \
                        (watch.flushed >= args.flushes or now > t_writing + args.flush_timeout):
                    t_flushed = now  # the cut comes `delay` s after that
                if t_flushed is not None and delay is not None and now >= t_flushed + delay:
                    # The power cut: the disk stops (nbdkit frozen: nothing more reaches the
                    # backing file), the machine dies, then the disk's unflushed writes with it.
                    nbdkit.freeze()
                    guest.process.send_signal(signal.SIGKILL)
                    guest.process.wait()
                    nbdkit.kill()
                    cut = True
                    break
                if guest.process.poll() is not None:
                    break
                if now - t0 > args.boot_timeout + (delay or 0):
                    guest.process.kill()
                    guest.process.wait()
                    raise Failed(f"boot {boot}: no progress within {args.boot_timeout:.0f} s")
                time.sleep(0.05)
            guest_out = open(out_path, errors="replace").read()
            status = None if cut else vm.wait(guest, 60)
            guest = None
            if not cut:
                nbdkit.stop()
            nbdkit = None
            check = read_json(prefix + "-check.json")
            compare = read_json(prefix + "-compare.json")
            timing = ""
            if t_checked is not None:
                timing += f"checked at {t_checked - t0:.1f} s, "
            if t_writing is not None:
                timing += f"writer at {t_writing - t0:.1f} s, "
            if t_flushed is not None:
                timing += (f"FLUSH {args.flushes} answered at {t_flushed - t0:.1f} s, " if watch.flushed >= args.flushes
                           else f"{watch.flushed} FLUSH(es) answered within {args.flush_timeout:.0f} s, ")
            timings.append(time.monotonic() - t0)
            result = ""
            if phase != "first":
                if not check or not compare:
                    raise Failed(f"boot {boot}: no check result\n{guest_out}")
                c, m = check[0], compare[0]
                checked += c["durable_last_session"]
                lost += c["lost"]
                corrupt += c["corrupt"]
                diverged += m["diverged"]
                result = (f"; cut {boot - 1}: {c['durable_last_session']} flushed of {c['acked_last_session']} "
                          f"acked writes ({c['flushes_acked_last_session']} flushes), lost {c['lost']}, "
                          f"corrupt {c['corrupt']}, diverged {m['diverged']}")
            if cut:
                say(f"boot {boot}: {timing}power cut {delay:.2f} s later at {timings[-1]:.1f} s{result}")
            else:
                say(f"boot {boot}: {timing}guest exit {status} at {time.monotonic() - t0:.1f} s{result}")
            if args.control and lost:
                say(guest_out.rstrip())
                ok = True
                break
            if lost or corrupt or diverged or (not cut and (status != 0 or phase != "last")):
                say(guest_out.rstrip())
                for name in sorted(os.listdir(run_dir)):
                    if name.startswith(f"boot{boot}-") and name.endswith(".log"):
                        say(f"--- {name}\n" + open(os.path.join(run_dir, name), errors="replace").read()[-3000:])
                raise Failed(f"boot {boot} failed")
        else:
            ok = not args.control
        elapsed = time.monotonic() - started
        if args.control:
            if ok:
                say(f"power-cut control: lost {lost} of {checked} flushed writes (corrupt {corrupt}) after "
                    f"cut {boot - 1}, as it must without fdatasync; seed {seed}, {elapsed:.0f} s")
            else:
                say(f"power-cut control: FAILED: {cuts} cut(s) without fdatasync lost no flushed write "
                    f"(flushed writes checked {checked}); seed {seed}")
        else:
            say(f"power-cut: cuts {cuts}, flushed writes checked {checked}, lost {lost}, corrupt {corrupt}, "
                f"diverged {diverged}; seed {seed}, {elapsed:.0f} s ({', '.join(f'{t:.0f}' for t in timings)} s a boot)")
    except Failed as e:
        say(f"{label}: FAILED: {e}; seed {seed}, scratch {scratch}")
        ok = False
        args.keep = True
    finally:
        if guest is not None:
            guest.process.kill()
            guest.process.wait()
        if nbdkit is not None:
            nbdkit.kill()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
