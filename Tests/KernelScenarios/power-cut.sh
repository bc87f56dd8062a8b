# The guest's side of the power-cut test: Tests/KernelScenarios/power-cut.py boots
# it with /dev/vda served by a host nbdkit (cache filter, writeback: a write
# reaches the host's file only on FLUSH) and cuts the power by SIGKILL of QEMU
# and of that nbdkit while the writer runs.
# Usage: power-cut.sh KEEL PHASE BOOT
#   PHASE first: mkfs.ext4 /dev/vda, start the volume, write until the cut
#         again: start the volume (it makes its replicas identical where writes
#                were in flight), check the last cut, write until the next one
#         last:  start the volume, check the last cut, stop cleanly
# The current directory is the run directory, a share of the host's: it holds
# power-cut.env (the settings), the stamp log, every process's log and the
# check results, none of them on the disk being cut.
set -eu
KEEL=$1 PHASE=$2 BOOT=$3
run=$(pwd)
. "$run/power-cut.env"   # SIZE BLOCKS OFFSET DEPTH FLUSH_EVERY WRITE_SECONDS FAULTS
export PYTHONDONTWRITEBYTECODE=1
work=$(mktemp -d /tmp/power-cut.XXXXXX)   # sockets, on the guest's tmpfs
disk=/mnt/disk
uri="nbd+unix:///vol?socket=$work/engine.sock"
logs="$run/boot$BOOT"

step() { echo "== [$(cut -d' ' -f1 /proc/uptime) s] boot $BOOT ($PHASE): $*"; }

# wait_for_socket PATH PID
wait_for_socket() {
    for _ in $(seq 900); do
        [ -S "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || { echo "no socket $1: the process exited"; exit 1; }
        sleep 0.1
    done
    echo "no socket $1"; exit 1
}

on_exit() {
    status=$?
    if [ $status -ne 0 ]; then for f in "$logs"-*.log; do echo "--- $f"; tail -20 "$f"; done; fi
    exit $status
}
trap on_exit EXIT

if [ "$PHASE" = first ]; then
    step "mkfs.ext4 on /dev/vda"
    mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/vda
fi
mkdir -p "$disk"
# commit=60: the journal's own commits (which flush the device every 5 s by
# default) stay out of the way, so what survives is what Keel's fdatasync made
# durable; mounting replays the journal after a cut.
mount -o commit=60 /dev/vda "$disk"

step "3 replicas and an engine${FAULTS:+ (replicas with KEEL_REPLICA_FAULTS=$FAULTS)}"
for i in 0 1 2; do
    env ${FAULTS:+KEEL_REPLICA_FAULTS=$FAULTS} "$KEEL" replica serve --dir "$disk/r$i" \
        --listen "unix:$work/r$i.sock" --size "$SIZE" 2>>"$logs-r$i.log" &
    eval "replica$i=$!"
done
for i in 0 1 2; do eval "wait_for_socket $work/r$i.sock \$replica$i"; done
step "replicas up"
# --replica-timeout 30: under TCG, copying a 4 MiB dirty range at start took longer than 5 s
# (the engine then exits: "cannot make the replicas identical ... no answer within 5.0 s").
"$KEEL" engine serve --volume vol --size "$SIZE" --listen "unix:$work/engine.sock" \
    --control "unix:$work/engine.control" --replica-timeout 30 \
    --replica "unix:$work/r0.sock" --replica "unix:$work/r1.sock" --replica "unix:$work/r2.sock" \
    2>>"$logs-engine.log" &
engine=$!
for _ in $(seq 1200); do   # it says so once it has claimed the replicas and made them identical
    grep -q "serving volume" "$logs-engine.log" && break
    kill -0 "$engine" 2>/dev/null || { echo "the engine exited"; exit 1; }
    sleep 0.1
done
grep -q "serving volume" "$logs-engine.log" || { echo "the engine did not start serving"; exit 1; }
step "engine serving$(grep -h "made the replicas identical" "$logs-engine.log" | sed 's/^.*\] /: /')"

# One Python for the check and the writer: an interpreter start costs seconds under TCG.
step "$([ "$PHASE" = first ] || echo "check the last cut; ")$([ "$PHASE" = last ] || echo "write until the power is cut")"
/usr/bin/python3 - "$(dirname "$0")/../Tools" "$run" "$logs" "$PHASE" "$uri" "$disk" 2>>"$logs-writer.log" <<'EOF'
import contextlib, json, sys
tools, run, logs, phase, uri, disk = sys.argv[1:7]
env = dict(line.strip().split("=", 1) for line in open(run + "/power-cut.env") if "=" in line)
sys.path.insert(0, tools)
import stamp
log = run + "/stamp.log"


def stamp_main(argv, out=None):
    sys.argv = ["stamp.py"] + argv
    with contextlib.ExitStack() as stack:
        if out:
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(out, "w"))))
        try:
            return stamp.main()
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2


if phase != "first":
    # Every write acknowledged before an acknowledged FLUSH (or with FUA) survived, read through
    # the engine; and the three replicas, each read alone, are identical.
    check = stamp_main(["check", "--durable", "--log", log, "--uri", uri, "--json"], logs + "-check.json")
    heads = [f"{disk}/r{i}/layers/head.img" for i in range(3)]
    compare = stamp_main(["compare", "--log", log, "--json"] + heads, logs + "-compare.json")
    for path in (logs + "-check.json", logs + "-compare.json"):
        for line in open(path):
            r = json.loads(line)
            print(r["line"])
            for b in r.get("bad", [])[:5]:
                print("  block %(block)d: %(kind)s: %(detail)s; expected %(expected)s" % b)
            for b in r.get("blocks_diverged", [])[:5]:
                print("  block %d diverged: %s" % (b["block"], ", ".join(b["found"])))
    open(logs + "-checked", "w").close()
    print("== [%s s] checked" % open("/proc/uptime").read().split()[0], flush=True)
    if check != 0 or compare != 0:
        print("power-cut: the check after the cut failed", flush=True)
        sys.exit(1)
if phase == "last":
    sys.exit(0)
print(f"stamp writer: 2 connections, depth {env['DEPTH']}, a FLUSH every {env['FLUSH_EVERY']} writes", flush=True)
stamp_main(["write", "--uri", uri, "--uri", uri, "--blocks", env["BLOCKS"], "--offset", env["OFFSET"],
            "--depth", env["DEPTH"], "--flush-every", env["FLUSH_EVERY"], "--seconds", env["WRITE_SECONDS"],
            "--log", log])
print("power-cut: the writer ended before the power was cut", flush=True)
sys.exit(1)
EOF

kill -TERM "$engine"; wait "$engine"
for i in 0 1 2; do eval "kill -TERM \$replica$i; wait \$replica$i"; done
umount "$disk"
echo "power-cut: stopped cleanly after the last check"
