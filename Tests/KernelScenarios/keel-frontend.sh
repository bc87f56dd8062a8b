# Keel's own kernel frontend: `engine serve --frontend kernel` attaches the
# volume over netlink with 2 connections and prints /dev/nbdX, whose sysfs
# backend is keel:vol; mkfs, mount, write, checksum; `keel frontend disable`
# (idle) detaches and `enable` attaches again, filesystem intact; SIGTERM
# detaches; a new engine attaches again and the checksums match. A real
# udevd with Udev/60-keel.rules gives the device the link /dev/keel/vol.
. "$(dirname "$0")/common.sh"
start_udev
for i in 0 1 2; do start_replica $i 256M; done

step "engine serve --frontend kernel"
start_kernel_engine 256M
udevadm settle --timeout=30
echo "/dev/keel/vol -> $(readlink -f /dev/keel/vol)"
[ "$(readlink -f /dev/keel/vol)" = "$device" ] || { echo "udev gave no /dev/keel/vol for $device"; exit 1; }
fill_filesystem /dev/keel/vol
umount /mnt/vol
step "keel frontend disable, then enable"
"$KEEL" frontend disable --engine "unix:$work/engine.control"
[ "$(cat /sys/block/$nbd/size)" = 0 ] || { echo "$nbd still has a size after frontend disable"; exit 1; }
udevadm settle --timeout=30
[ ! -e /dev/keel/vol ] || { echo "/dev/keel/vol outlived the detach"; exit 1; }
"$KEEL" status --engine "unix:$work/engine.control" | head -1
device=$("$KEEL" frontend enable --engine "unix:$work/engine.control")
nbd=$(basename "$device")
for _ in $(seq 100); do [ "$(cat /sys/block/$nbd/size)" != 0 ] && break; sleep 0.1; done
"$KEEL" status --engine "unix:$work/engine.control" | head -1
udevadm settle --timeout=30
[ "$(readlink -f /dev/keel/vol)" = "$device" ] || { echo "no /dev/keel/vol after enable"; exit 1; }
fsck.ext4 -n /dev/keel/vol >/dev/null
mount /dev/keel/vol /mnt/vol
(cd /mnt/vol && sha256sum -c "$work/sums")
umount /mnt/vol
step "SIGTERM: the engine detaches the device"
kill -TERM "$engine"
wait "$engine"
[ "$(cat /sys/block/$nbd/size)" = 0 ] || { echo "$nbd still has a size after detach"; exit 1; }
step "a new engine attaches again"
start_kernel_engine 256M
mount "$device" /mnt/vol
(cd /mnt/vol && sha256sum -c "$work/sums")
umount /mnt/vol
kill -TERM "$engine"
wait "$engine"
echo "keel frontend: checksums match"
