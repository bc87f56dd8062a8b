# keel migrate on a volume systemd runs. Its engine is keel-engine@vol; one
# unit cannot run twice, so engine B starts as the volume's other engine unit,
# keel-engine-alt@vol, standing by, here from a copied keel binary (a live
# upgrade: a drop-in replaces the unit's ExecStart). The volume is attached
# with --mapper and mounted, fio randwrite with verify running. Rollback: B's
# unit stopped, disabled and its files gone, A never noticed. Confirm under
# fio: keel-engine-alt@vol is the volume's engine (the registry says so, its
# environment file is an engine's); kill -9 of it, and the frontend starts that
# unit again (still the new binary). A second migration, with this keel, back
# to keel-engine@vol, with engine A killed while B stands by: B takes over,
# A's unit is disabled, confirm answers that the volume runs on B. Detach
# disables the engine's unit; attach again and the files are there; rm removes
# both units' files.
. "$(dirname "$0")/common.sh"
[ "$(cat /proc/1/comm)" = systemd ] || { echo "PID 1 is not systemd"; exit 1; }
repo=$(cd "$(dirname "$0")/../.." && pwd)
journal() {
    status=$?
    [ $status -ne 0 ] && journalctl -u keel-engine@vol -u keel-engine-alt@vol -u keel-frontend@vol --no-pager | tail -40
    (exit $status); on_exit
}
trap journal EXIT

step "install: binary, units (both engine units), udev rule"
install -m 0755 "$KEEL" /usr/local/bin/keel
# Not under /tmp: the units have a private /tmp.
install -D -m 0755 "$KEEL" /usr/local/lib/keel-upgraded/keel
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
unit_state() { echo "$(systemctl is-enabled "$1" 2>/dev/null || true)/$(systemctl is-active "$1" 2>/dev/null || true)"; }
expect_unit() { [ "$(unit_state "$1")" = "$2" ] || { echo "$1 is $(unit_state "$1"), not $2"; exit 1; }; }
main_pid() { systemctl show -p MainPID --value "$1"; }
fio_start() {
    fio --name=cell --filename=/mnt/vol/fio.dat --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 \
        --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --eta=never \
        --time_based --runtime="$1" --output="$work/fio.out" &
    fio=$!
    sleep 1
}
status_says() { "$KEEL" migrate status vol | tee "$work/status" | head -3; grep -q "$1" "$work/status" || { echo "status lacks '$1'"; exit 1; }; }

step "create, attach --mapper, mount"
"$KEEL" volume create vol --size 256M --replicas 3
"$KEEL" volume attach vol --mapper --io-timeout 15
expect_unit keel-engine@vol enabled/active
fill_filesystem /dev/keel/vol

step "start: engine B as keel-engine-alt@vol from another binary, standing by; rollback"
fio_start 20
"$KEEL" migrate start vol --binary /usr/local/lib/keel-upgraded/keel
status_says "phase standing by"
expect_unit keel-engine-alt@vol enabled/active
grep -q -- "--standby" /etc/keel/volume-alt-vol.env
cat /etc/systemd/system/keel-engine-alt@vol.service.d/executable.conf
a=$(main_pid keel-engine@vol)
"$KEEL" migrate rollback vol
status_says "rolled back"
expect_unit keel-engine-alt@vol disabled/inactive
[ ! -e /etc/keel/volume-alt-vol.env ] && [ ! -e /etc/systemd/system/keel-engine-alt@vol.service.d ] || { echo "the rollback left engine B's unit files"; exit 1; }
[ "$(main_pid keel-engine@vol)" = "$a" ] || { echo "engine A changed on rollback"; exit 1; }
check_fio

step "confirm under fio: keel-engine-alt@vol is the volume's engine"
fio_start 30
"$KEEL" migrate start vol --binary /usr/local/lib/keel-upgraded/keel
"$KEEL" migrate confirm vol
status_says "migration_status success"
expect_unit keel-engine@vol disabled/inactive
expect_unit keel-engine-alt@vol enabled/active
b=$(main_pid keel-engine-alt@vol)
tr '\0' ' ' < "/proc/$b/cmdline" | grep -q keel-upgraded || { echo "the engine is not B's binary"; exit 1; }
if grep -q -- "--standby" /etc/keel/volume-alt-vol.env; then echo "engine B's unit would start standing by again"; exit 1; fi
"$KEEL" volume show vol | head -3
check_fio
(cd /mnt/vol && sha256sum -c --quiet "$work/sums")

step "kill -9 of engine B: the frontend starts keel-engine-alt@vol again, the new binary still"
kill -9 "$b"
for _ in $(seq 900); do
    pid=$(main_pid keel-engine-alt@vol)
    [ "$pid" != 0 ] && [ "$pid" != "$b" ] && [ "$(systemctl is-active keel-engine-alt@vol)" = active ] && break
    sleep 0.1
done
echo "engine pid $b -> $pid"
[ "$pid" != "$b" ] && [ "$pid" != 0 ] || { echo "the frontend did not start keel-engine-alt@vol again"; exit 1; }
tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q keel-upgraded || { echo "the restarted engine is not B's binary"; exit 1; }
expect_unit keel-engine@vol disabled/inactive
(cd /mnt/vol && sha256sum -c --quiet "$work/sums")

step "a second migration, with this keel, back to keel-engine@vol; engine A killed while B stands by: B takes over"
fio_start 30
"$KEEL" migrate start vol
expect_unit keel-engine@vol enabled/active
kill -9 "$(main_pid keel-engine-alt@vol)"
for _ in $(seq 900); do "$KEEL" migrate status vol | grep -q "engine A was lost" && break; sleep 0.2; done
status_says "running on engine B (engine A was lost)"
expect_unit keel-engine-alt@vol disabled/inactive
"$KEEL" migrate confirm vol | tee "$work/confirm"
grep -q "already runs on engine B" "$work/confirm" || { echo "confirm does not say it runs on B"; exit 1; }
status_says "migration_status success"
expect_unit keel-engine@vol enabled/active
tr '\0' ' ' < "/proc/$(main_pid keel-engine@vol)/cmdline" | grep -q "^/usr/local/bin/keel " || { echo "the engine is not this keel"; exit 1; }
check_fio

step "detach, attach again, rm"
umount /mnt/vol
"$KEEL" volume detach vol
expect_unit keel-engine@vol disabled/inactive
expect_unit keel-engine-alt@vol disabled/inactive
"$KEEL" volume attach vol --mapper
mount /dev/keel/vol /mnt/vol
(cd /mnt/vol && sha256sum -c --quiet "$work/sums")
umount /mnt/vol
"$KEEL" volume detach vol
"$KEEL" volume rm vol
for f in /etc/keel/volume-vol.env /etc/keel/volume-alt-vol.env /etc/systemd/system/keel-engine@vol.service.d \
    /etc/systemd/system/keel-engine-alt@vol.service.d; do
    [ ! -e "$f" ] || { echo "rm left $f"; exit 1; }
done
umount /var/lib/keel
echo "keel migrate under systemd: complete"
