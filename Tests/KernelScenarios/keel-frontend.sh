# Keel's device frontend on a local engine: `keel frontend serve` attaches the
# volume over netlink with 2 connections and prints /dev/nbdX, whose sysfs
# backend is keel:vol; a real udevd with Udev/60-keel.rules gives it the link
# /dev/keel/vol. mkfs, mount, write, checksum. SIGTERM to the frontend (idle)
# detaches the device (the link goes) while the engine runs on; a new
# frontend attaches again, filesystem intact. A frontend killed (-9) leaves
# the device working (the kernel holds its sockets); a new one takes it over,
# and when the engine is then restarted under fio, that one reconnects it.
. "$(dirname "$0")/common.sh"
start_udev
for i in 0 1 2; do start_replica $i 256M; done

step "engine serve, frontend serve"
start_kernel_engine 256M
udevadm settle --timeout=30
echo "/dev/keel/vol -> $(readlink -f /dev/keel/vol)"
[ "$(readlink -f /dev/keel/vol)" = "$device" ] || { echo "udev gave no /dev/keel/vol for $device"; exit 1; }
fill_filesystem /dev/keel/vol
umount /mnt/vol
"$KEEL" status --engine "unix:$work/engine.control" | head -1

step "SIGTERM: the frontend detaches the device; the engine runs on"
kill -TERM "$frontend"
wait "$frontend"
[ "$(cat /sys/block/$nbd/size)" = 0 ] || { echo "$nbd still has a size after the frontend stopped"; exit 1; }
udevadm settle --timeout=30
[ ! -e /dev/keel/vol ] || { echo "/dev/keel/vol outlived the detach"; exit 1; }
"$KEEL" status --engine "unix:$work/engine.control" | head -1

step "a new frontend attaches again"
start_frontend "unix:$work/engine.sock"
udevadm settle --timeout=30
[ "$(readlink -f /dev/keel/vol)" = "$device" ] || { echo "no /dev/keel/vol after the new frontend"; exit 1; }
fsck.ext4 -n /dev/keel/vol >/dev/null
mount /dev/keel/vol /mnt/vol
(cd /mnt/vol && sha256sum -c "$work/sums")
umount /mnt/vol

step "the frontend killed (-9): the device works on; a new frontend takes it over"
kill -9 "$frontend"
wait "$frontend" 2>/dev/null || true
dd if="$device" of=/dev/null bs=1M count=8 iflag=direct status=none
first=$device
start_frontend "unix:$work/engine.sock"
[ "$device" = "$first" ] || { echo "the new frontend attached $device, not $first"; exit 1; }
grep "took over" "$work/frontend.log"
start_fio_verify 12
sleep 3
kill -9 "$engine"
wait "$engine" 2>/dev/null || true
start_plain_engine 256M
check_fio
grep "new connection" "$work/frontend.log" | tail -1
stop_kernel_engine
[ "$(cat /sys/block/$nbd/size)" = 0 ] || { echo "$nbd still has a size after detach"; exit 1; }
echo "keel frontend: checksums match"
