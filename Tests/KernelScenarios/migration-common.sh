# Shared by the migration matrix scenarios: a volume of keel volume attached
# with --mapper, mounted, fio randwrite with verify on it (rounds of 3 s until
# the cell ends: fio_rounds_start in common.sh); checks after a cell.
# Usage: . migration-common.sh KEEL_BINARY
. "$(dirname "$0")/common.sh"
start_udev
export KEEL_STATE_DIR="$work/data/state"
state_logs() {
    status=$?
    if [ $status -ne 0 ]; then for f in "$KEEL_STATE_DIR"/log/*; do echo "--- $f"; tail -n 25 "$f"; done; fi
    (exit $status); on_exit
}
trap state_logs EXIT
engines() { pgrep -f "engine serve --volume vol " || true; }
one_engine() {
    for _ in $(seq 100); do [ "$(engines | wc -l)" = 1 ] && return 0; sleep 0.1; done
    echo "engines: $(engines | tr '\n' ' ')"; exit 1
}
# Every engine, replica and frontend keel runs (named by the state directory) has its pid file there: no orphans.
no_orphans() {
    for pid in $(pgrep -f " (engine|replica|frontend) serve .*$KEEL_STATE_DIR" || true); do
        cat "$KEEL_STATE_DIR"/run/*.pid 2>/dev/null | grep -qx "$pid" && continue
        echo "orphan process $pid: $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)"; exit 1
    done
}
status_says() { "$KEEL" migrate status vol | tee "$work/status" | head -3; grep -q "$1" "$work/status" || { echo "status lacks '$1'"; exit 1; }; }
fio_start() { fio_rounds_start /mnt/vol/fio.dat; }
cells=""
cell_end() {
    fio_rounds_stop
    one_engine
    no_orphans
    (cd /mnt/vol && sha256sum -c --quiet "$work/sums")
    echo "cell $1: passed"
    cells="$cells $1"
}
cp "$KEEL" "$work/keel-upgraded"
# mounted_volume CREATE_ARGS...: volume vol created with them, attached with --mapper, files on ext4 in /mnt/vol.
# The kernel's I/O timeout is 15 s (not 30): a cell whose engine is lost waits that long for the failover.
mounted_volume() {
    "$KEEL" volume create vol --size 256M "$@"
    "$KEEL" volume attach vol --mapper --io-timeout 15
    fill_filesystem /dev/keel/vol
}
