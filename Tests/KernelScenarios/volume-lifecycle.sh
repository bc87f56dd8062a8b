# `keel volume` on a host without systemd, where keel runs the daemons itself:
# create with 2 local replicas; attach prints /dev/nbdX and /dev/keel/vol (a
# real udevd); mkfs, mount, write, checksum; while attached, rm and a second
# attach are refused, and a volume asked onto the busy device is refused with
# nothing left half-attached; detach, attach again onto a chosen device
# (--device), checksums match; the
# engine killed -9 under a mounted filesystem: its device frontend starts it
# again and reconnects the same device, and attach answers that the volume is
# attached; a snapshot by volume name, listed from the
# registry once detached; detach; rm leaves no daemon behind.
. "$(dirname "$0")/common.sh"
start_udev
export KEEL_STATE_DIR="$work/data/state"

engine_running() { pgrep -f "keel engine serve --volume $1 " >/dev/null; }

step "keel volume create, attach"
"$KEEL" volume create vol --size 256M --replicas 2
"$KEEL" volume attach vol > "$work/attach.out"
cat "$work/attach.out"
device=$(sed -n 1p "$work/attach.out")
[ -b "$device" ] || { echo "no device: '$device'"; exit 1; }
[ "$(sed -n 2p "$work/attach.out")" = /dev/keel/vol ] || { echo "attach printed no /dev/keel/vol"; exit 1; }
[ "$(readlink -f /dev/keel/vol)" = "$device" ] || { echo "/dev/keel/vol does not point at $device"; exit 1; }
nbd=$(basename "$device")
echo "backend $(cat /sys/block/$nbd/backend)"
fill_filesystem /dev/keel/vol
"$KEEL" volume ls

step "refusals while attached"
expect_refusal "is attached as $device" volume rm vol
expect_refusal "already attached as $device" volume attach vol
"$KEEL" volume create other --size 64M --replicas 1
expect_refusal "in use by another NBD connection" volume attach other --device "$device"
if engine_running other; then echo "the refused attach left an engine running"; exit 1; fi
if pgrep -f "keel frontend serve --volume other " >/dev/null; then echo "the refused attach left a frontend running"; exit 1; fi
if grep -qx keel:other /sys/block/nbd*/backend 2>/dev/null; then echo "a device carries keel:other"; exit 1; fi
"$KEEL" volume show other --json | grep -q '"state" : "detached"'

step "detach, attach again"
umount /mnt/vol
"$KEEL" volume detach vol
[ "$(cat /sys/block/$nbd/size)" = 0 ] || { echo "$nbd still has a size after detach"; exit 1; }
udevadm settle --timeout=30
[ ! -e /dev/keel/vol ] || { echo "/dev/keel/vol outlived the detach"; exit 1; }
"$KEEL" volume ls | grep -q "^vol .*detached" || { echo "ls does not show vol detached"; exit 1; }
device=$("$KEEL" volume attach vol --device /dev/nbd2 | head -1)
[ "$device" = /dev/nbd2 ] || { echo "attach --device /dev/nbd2 gave $device"; exit 1; }
"$KEEL" volume ls | grep -q "^vol .*attached /dev/nbd2$" || { echo "ls does not see the engine of vol"; exit 1; }
udevadm settle --timeout=30
mount /dev/keel/vol /mnt/vol
(cd /mnt/vol && sha256sum -c "$work/sums")

step "a snapshot of a volume of this node (no --engine)"
"$KEEL" snapshot create vol first
"$KEEL" snapshot ls vol | grep -q "^first " || { echo "snapshot ls does not show first"; exit 1; }

step "engine killed -9: its device frontend, the only restarter, starts it again and reconnects the device"
frontend_log="$KEEL_STATE_DIR"/log/keel-frontend@vol.service.log
connections_before=$(grep -c "new connection" "$frontend_log" || true)
old=$(pgrep -f "keel engine serve --volume vol ")
pkill -9 -f "keel engine serve --volume vol "
for _ in $(seq 900); do
    new=$(pgrep -f "keel engine serve --volume vol " || true)
    [ -n "$new" ] && [ "$new" != "$old" ] && [ "$(grep -c "new connection" "$frontend_log")" -gt "$connections_before" ] && break
    sleep 0.1
done
[ -n "$new" ] && [ "$new" != "$old" ] || { echo "the frontend did not start the engine again"; tail -20 "$frontend_log"; exit 1; }
grep "engine of vol" "$frontend_log" | tail -1
[ "$(grep -c "new connection" "$frontend_log")" -gt "$connections_before" ] || { echo "the device was not reconnected"; tail -20 "$frontend_log"; exit 1; }
"$KEEL" volume ls
if "$KEEL" volume attach vol > "$work/again.out" 2>&1; then echo "attach of an attached volume succeeded"; exit 1; fi
grep -q "already attached as $device" "$work/again.out" || { cat "$work/again.out"; exit 1; }
(cd /mnt/vol && sha256sum -c "$work/sums")
head -c 4M /dev/urandom > /mnt/vol/file3
sync
grep "new connection" "$KEEL_STATE_DIR"/log/keel-frontend@vol.service.log | tail -1
umount /mnt/vol
"$KEEL" volume show vol

step "detach: snapshot ls answers from the registry, rm"
"$KEEL" volume detach vol
"$KEEL" snapshot ls vol --json > "$work/snapshots.json" 2> "$work/snapshots.err"
grep -q '"name" : "first"' "$work/snapshots.json" || { echo "no snapshot first in the registry's list"; cat "$work/snapshots.json"; exit 1; }
grep -q "no engine running" "$work/snapshots.err" || { echo "ls did not say it answered from the registry"; exit 1; }
"$KEEL" volume rm vol
"$KEEL" volume rm other
"$KEEL" volume ls --json
if pgrep -f "keel (replica|engine|frontend) serve" >/dev/null; then echo "daemons outlived rm"; pgrep -af keel; exit 1; fi
echo "keel volume: lifecycle complete"
