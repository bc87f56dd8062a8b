# Shared by the real-kernel scenarios; runs inside the guest (see scripts/kernel-vm).
# Usage: . common.sh KEEL_BINARY
set -eu
KEEL=$1
work=$(mktemp -d /tmp/keel.XXXXXX)
pids=""

began=$(date +%s)
step() { echo "== [$(($(date +%s) - began)) s] $*"; }

# Replica data needs O_DIRECT: ext4 on a loop device (the guest's tmpfs refuses it).
truncate -s 3G "$work/disk.img"
mkfs.ext4 -q "$work/disk.img"
mkdir "$work/data"
mount -o loop "$work/disk.img" "$work/data"

wait_for_socket() {
    for _ in $(seq 300); do [ -S "$1" ] && return 0; sleep 0.1; done
    echo "no socket $1"; cat "$work"/*.log; exit 1
}

# start_replica INDEX SIZE [DATA_ROOT]: DATA_ROOT defaults to the ext4 loop mount.
start_replica() {
    "$KEEL" replica serve --dir "${3:-$work/data}/r$1" --listen "unix:$work/r$1.sock" --size "$2" 2>>"$work/r$1.log" &
    eval "replica$1=$!"
    wait_for_socket "$work/r$1.sock"
}

start_engine() {
    "$KEEL" engine serve --volume vol --size "$1" --listen "unix:$work/engine.sock" --control "unix:$work/engine.control" \
        --replica "unix:$work/r0.sock" --replica "unix:$work/r1.sock" --replica "unix:$work/r2.sock" \
        --replica-timeout "${REPLICA_TIMEOUT:-30}" 2>>"$work/engine.log" &
    engine=$!
    wait_for_socket "$work/engine.sock"
}

attach() {
    nbd-client -unix "$work/engine.sock" /dev/nbd0 -name vol -connections 2 -block-size 4096 -timeout 60 >/dev/null
    for _ in $(seq 100); do [ "$(cat /sys/block/nbd0/size)" != 0 ] && return 0; sleep 0.1; done
    echo "/dev/nbd0 did not get a size"; exit 1
}

detach() { nbd-client -d /dev/nbd0 >/dev/null; }

on_exit() {
    status=$?
    if [ $status -ne 0 ]; then
        for f in "$work"/*.log; do echo "--- $f"; tail -20 "$f"; done
        # The kernel's own account (nbd: timeouts, dead links, fallbacks) of a failed run.
        echo "--- dmesg"; dmesg | tail -30
    fi
    exit $status
}
trap on_exit EXIT

# The engine on unix:$work/engine.sock (control: engine.control), once it serves.
# REPLICAS replaces the three unix-socket replicas' --replica options; ENGINE_EXTRA adds options.
# REPLICA_TIMEOUT overrides the engine's replica timeout: 30 s unless a scenario tests it
# (link-dead): under TCG on a busy 2-core host the whole guest can stall for seconds, and
# 5 s once failed all three replicas at once in a clean-clone CI run.
start_plain_engine() {
    : > "$work/engine.log"
    "$KEEL" engine serve --volume vol --size "$1" --listen "${ENGINE_LISTEN:-unix:$work/engine.sock}" \
        --control "unix:$work/engine.control" --replica-timeout "${REPLICA_TIMEOUT:-30}" \
        ${REPLICAS:---replica unix:$work/r0.sock --replica unix:$work/r1.sock --replica unix:$work/r2.sock} \
        ${ENGINE_EXTRA:-} 2>>"$work/engine.log" &
    engine=$!
    for _ in $(seq 1200); do
        grep -q "serving volume" "$work/engine.log" && return 0
        kill -0 "$engine" 2>/dev/null || { echo "the engine exited"; exit 1; }
        sleep 0.1
    done
    echo "the engine did not start serving"; exit 1
}

# The engine and a device frontend on it (keel frontend serve); sets $engine,
# $frontend, $device and $nbd. IO_TIMEOUT and DEAD_CONNECTION_TIMEOUT set the device's.
start_kernel_engine() {
    start_plain_engine "$1"
    start_frontend "unix:$work/engine.sock"
}

# The frontend drains and detaches the device, then the engine stops.
stop_kernel_engine() {
    kill -TERM "$frontend"
    wait "$frontend"
    kill -TERM "$engine"
    wait "$engine"
}

# start_frontend ENGINE_ADDRESS: keel frontend serve holds the device connected to
# the engine at that address; sets $frontend, $device and $nbd once it has its size.
start_frontend() {
    : > "$work/frontend.out"
    "$KEEL" frontend serve --volume vol --engine "$1" --connections 2 --io-timeout "${IO_TIMEOUT:-5}" \
        --dead-connection-timeout "${DEAD_CONNECTION_TIMEOUT:-120}" --log-level info ${FRONTEND_EXTRA:-} \
        >"$work/frontend.out" 2>>"$work/frontend.log" &
    frontend=$!
    for _ in $(seq 300); do grep -q /dev/nbd "$work/frontend.out" && break; sleep 0.1; done
    device=$(cat "$work/frontend.out")
    [ -b "$device" ] || { echo "no device from the frontend: '$device'"; exit 1; }
    nbd=$(basename "$device")
    # With --mapper the frontend prints its device-mapper device: the NBD device is the one under it.
    case "$device" in /dev/mapper/*)
        dm=$(basename "$(readlink -f "/sys/dev/block/$(printf '%d:%d' "0x$(stat -c %t "$device")" "0x$(stat -c %T "$device")")")")
        nbd=$(ls "/sys/block/$dm/slaves");;
    esac
    for _ in $(seq 100); do [ "$(cat /sys/block/$nbd/size)" != 0 ] && break; sleep 0.1; done
    echo "attached $device, backend $(cat /sys/block/$nbd/backend)"
    [ "$(cat /sys/block/$nbd/backend)" = keel:vol ]
}

# make_node NAME ADDRESS: a network namespace linked to the guest's own by a
# veth pair; the guest's end is ADDRESS with the last byte 1. The node's
# address is ADDRESS/24.
make_node() {
    # The guest's own loopback too: its processes reach its addresses on the veth through lo.
    ip link set lo up
    ip netns add "$1"
    ip link add "h-$1" type veth peer name eth0 netns "$1"
    ip addr add "${2%.*}.1/24" dev "h-$1"
    ip link set "h-$1" up
    ip -n "$1" addr add "$2/24" dev eth0
    ip -n "$1" link set eth0 up
    ip -n "$1" link set lo up
}

# A real udevd in the guest with Keel's rule installed. The guest runs in a
# chroot, where udevadm would ignore trigger and settle without this:
export SYSTEMD_IGNORE_CHROOT=1
start_udev() {
    mkdir -p /etc/udev/rules.d /run/udev
    cp "$(dirname "$0")/../../Udev/60-keel.rules" /etc/udev/rules.d/
    /lib/systemd/systemd-udevd --daemon
    udevadm trigger --subsystem-match=block --action=add
    udevadm settle --timeout=30
}

# start_fio_verify SECONDS: 4k random writes with crc32c verification on $device
# (libaio, direct) in the background; sets $fio. Check with check_fio.
start_fio_verify() {
    fio --name=kernel --filename="$device" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
        --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --eta=never \
        --time_based --runtime="$1" --output="$work/fio.out" &
    fio=$!
}

check_fio() {
    wait "$fio"
    grep -E "IOPS|err=|clat \(|lat \(" "$work/fio.out"
    grep -q "err= 0" "$work/fio.out"
}

# fio_rounds_start FILE: fio randwrite with verify on FILE (16M) in rounds of 3 s, each verified,
# in the background until fio_rounds_stop (at most 300 s); a round with an I/O or verify error
# ends them. The I/O runs through whatever comes next and ends a round after it, not at a set time;
# at 50 writes a second (one every 20 ms, so every switch holds some), so that in the guest (TCG, a
# debug build) keel's commands are not starved: at 200 a second the matrix took 10 % longer.
fio_rounds_start() {
    rm -f "$work/fio.stop" "$work"/fio.round*
    (   end=$(($(date +%s) + 300)); round=0
        while [ ! -e "$work/fio.stop" ] && [ "$(date +%s)" -lt "$end" ]; do
            round=$((round + 1))
            fio --name=cell --filename="$1" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 \
                --rate_iops=50 --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --eta=never \
                --time_based --runtime=3 --output="$work/fio.round$round" || exit 1
        done
    ) &
    fio=$!
    sleep 1
}

# fio_rounds_stop: the rounds end; fails unless every round ended without an I/O or verify error.
fio_rounds_stop() {
    touch "$work/fio.stop"
    rounds_status=0; wait "$fio" || rounds_status=$?
    cat "$work"/fio.round* > "$work/fio.out" 2>/dev/null || true
    awk -v rounds="$(ls "$work"/fio.round* 2>/dev/null | wc -l)" '
        match($0, /^ +clat \((nsec|usec|msec)\): .*max=[0-9.]+/) {
            unit = substr($0, index($0, "(") + 1, 4); max = substr($0, index($0, "max=") + 4) + 0
            s = max / (unit == "nsec" ? 1e9 : unit == "usec" ? 1e6 : 1e3); if (s > longest) longest = s }
        END { printf "fio: %d round(s), longest completion %.2f s\n", rounds, longest }' "$work/fio.out"
    grep -E "err=" "$work/fio.out" | grep -v "err= 0" && rounds_status=1
    [ "$rounds_status" = 0 ] || { echo "fio failed"; tail -30 "$work/fio.out"; return 1; }
}

# install_systemd_units: keel in /usr/local/bin (KEEL points at it), Systemd/'s units and the udev rule
# installed as scripts/install does; /var/lib/keel is ext4 on a loop device (O_DIRECT).
install_systemd_units() {
    repo=$(cd "$(dirname "$0")/../.." && pwd)
    install -m 0755 "$KEEL" /usr/local/bin/keel
    cp "$repo"/Systemd/keel-replica@.service "$repo"/Systemd/keel-engine@.service "$repo"/Systemd/keel-engine-alt@.service \
        "$repo"/Systemd/keel-frontend@.service "$repo"/Systemd/keel-replicas.target /etc/systemd/system/
    systemctl daemon-reload
    mkdir -p /etc/udev/rules.d /var/lib/keel
    cp "$repo/Udev/60-keel.rules" /etc/udev/rules.d/
    udevadm control --reload
    truncate -s 2G "$work/keel.img"
    mkfs.ext4 -q "$work/keel.img"
    mount -o loop "$work/keel.img" /var/lib/keel
    KEEL=/usr/local/bin/keel
}
unit_state() { echo "$(systemctl is-enabled "$1" 2>/dev/null || true)/$(systemctl is-active "$1" 2>/dev/null || true)"; }

# expect_refusal PATTERN ARGS…: keel fails with one line matching PATTERN.
expect_refusal() {
    pattern=$1; shift
    if "$KEEL" "$@" >"$work/out" 2>"$work/err"; then echo "'keel $*' should have failed"; exit 1; fi
    cat "$work/err"
    [ "$(wc -l < "$work/err")" = 1 ] || { echo "more than one line"; exit 1; }
    grep -q "$pattern" "$work/err" || { echo "no '$pattern' in the refusal"; exit 1; }
}

# fill_filesystem DEVICE: mkfs.ext4, mount on /mnt/vol, write two files, sync,
# record their checksums in $work/sums (check with: cd /mnt/vol && sha256sum -c "$work/sums").
fill_filesystem() {
    mkfs.ext4 -q "$1"
    mkdir -p /mnt/vol
    mount "$1" /mnt/vol
    for i in 1 2; do head -c $((i * 4))M /dev/urandom > /mnt/vol/file$i; done
    sync
    (cd /mnt/vol && sha256sum file1 file2) > "$work/sums"
}
