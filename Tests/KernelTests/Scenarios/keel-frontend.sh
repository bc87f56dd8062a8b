# Keel's own kernel frontend: `engine serve --frontend kernel` attaches the
# volume over netlink with 2 connections and prints /dev/nbdX, whose sysfs
# backend is keel:vol; mkfs, mount, write, checksum; SIGTERM detaches; a new
# engine attaches again and the checksums match.
. "$(dirname "$0")/common.sh"
for i in 0 1 2; do start_replica $i 256M; done

start_kernel_engine() {
    : > "$work/engine.out"
    "$KEEL" engine serve --volume vol --size 256M --listen "unix:$work/engine.sock" \
        --replica "unix:$work/r0.sock" --replica "unix:$work/r1.sock" --replica "unix:$work/r2.sock" \
        --frontend kernel --connections 2 >"$work/engine.out" 2>>"$work/engine.log" &
    engine=$!
    for _ in $(seq 300); do grep -q /dev/nbd "$work/engine.out" && break; sleep 0.1; done
    device=$(cat "$work/engine.out")
    [ -b "$device" ] || { echo "no device from the engine: '$device'"; exit 1; }
    nbd=$(basename "$device")
    for _ in $(seq 100); do [ "$(cat /sys/block/$nbd/size)" != 0 ] && break; sleep 0.1; done
    echo "attached $device, backend $(cat /sys/block/$nbd/backend), $(ls /sys/block/$nbd/mq | wc -l) hardware queue(s)"
    [ "$(cat /sys/block/$nbd/backend)" = keel:vol ]
}

step "engine serve --frontend kernel"
start_kernel_engine
mkfs.ext4 -q "$device"
mkdir -p /mnt/vol
mount "$device" /mnt/vol
for i in 1 2; do head -c $((i * 4))M /dev/urandom > /mnt/vol/file$i; done
sync
(cd /mnt/vol && sha256sum file1 file2) > "$work/sums"
umount /mnt/vol
step "SIGTERM: the engine detaches the device"
kill -TERM "$engine"
wait "$engine"
[ "$(cat /sys/block/$nbd/size)" = 0 ] || { echo "$nbd still has a size after detach"; exit 1; }
step "a new engine attaches again"
start_kernel_engine
mount "$device" /mnt/vol
(cd /mnt/vol && sha256sum -c "$work/sums")
umount /mnt/vol
kill -TERM "$engine"
wait "$engine"
echo "keel frontend: checksums match"
