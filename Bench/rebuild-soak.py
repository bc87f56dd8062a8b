#!/usr/bin/env python3
"""Writes after online rebuilds, watched for stalls (release build, fio's nbd engine, replicas on
unix sockets): an engine over three replicas, the volume filled, three more replicas added
(`keel replica add`) and the first three removed; then --rounds runs of 4k randwrite QD32 for
--runtime seconds each. Reports each run's IOPS and longest completion latency, and every
replica the engine failed. A healthy run has no replica failed and no completion past a few
hundred ms. With --no-rebuild the volume stays on its first three replicas (the control).

Usage: Bench/rebuild-soak [--size 2G] [--rounds 10] [--runtime 5] [--no-rebuild] [--dir DIR]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import REPO, Server  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2G")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runtime", type=int, default=5)
    parser.add_argument("--no-rebuild", action="store_true")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    subprocess.run(["swift", "build", "-c", "release", "--product", "keel"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    keel = os.path.join(REPO, ".build/release/keel")
    work = tempfile.mkdtemp(prefix="keel-rebuildsoak-", dir=args.dir or "/var/tmp")
    servers = []
    failed = []
    try:
        socks = [os.path.join(work, f"r{i}.sock") for i in range(6)]
        for i, sock in enumerate(socks):
            servers.append(Server("replica", [keel, "replica", "serve", "--dir", os.path.join(work, f"r{i}"), "--listen",
                                              f"unix:{sock}", "--size", args.size], sock).__enter__())
        engine_sock, control = os.path.join(work, "engine.sock"), "unix:" + os.path.join(work, "engine.control")
        engine = Server("engine", [keel, "engine", "serve", "--volume", "soak", "--size", args.size, "--listen",
                                   f"unix:{engine_sock}", "--control", control]
                        + [a for sock in socks[:3] for a in ("--replica", f"unix:{sock}")], engine_sock).__enter__()
        servers.append(engine)
        uri = f"nbd+unix:///?socket={engine_sock}"
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M", "--iodepth=8",
                        f"--size={args.size}", "--output=/dev/null"], check=True)
        if not args.no_rebuild:
            for sock in socks[3:]:
                subprocess.run([keel, "replica", "add", "--engine", control, f"unix:{sock}"], check=True, capture_output=True)
            for sock in socks[:3]:
                subprocess.run([keel, "replica", "rm", "--engine", control, f"unix:{sock}"], check=True, capture_output=True)
        worst = 0.0
        for round_ in range(args.rounds):
            out = subprocess.run(["fio", "--output-format=json", "--name=job", "--ioengine=nbd", f"--uri={uri}",
                                  "--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={args.size}", "--randrepeat=0",
                                  "--norandommap", f"--runtime={args.runtime}", "--time_based"],
                                 check=True, capture_output=True, text=True).stdout
            job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
            longest = job["clat_ns"]["max"] / 1e6
            worst = max(worst, longest)
            print(f"  round {round_ + 1}: {round(job['iops'])} IOPS, longest completion {longest:.0f} ms", flush=True)
        engine.log.seek(0)
        lines = engine.log.read().decode(errors="replace").splitlines()
        failed = [line for line in lines if " failed (" in line]
        # The engine's account of each late link (libnbd's state, the polls armed) goes with it.
        reported = [line for line in lines if " failed (" in line or "left a command unanswered" in line]
        print(f"rebuild-soak: {'control, no rebuild' if args.no_rebuild else 'after 3 rebuilds'}: longest completion "
              f"{worst:.0f} ms, replicas failed {len(failed)}")
        for line in reported:
            print("  " + line)
    finally:
        for server in reversed(servers):
            server.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
