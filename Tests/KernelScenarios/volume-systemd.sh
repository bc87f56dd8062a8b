# `keel volume` on a host whose PID 1 is systemd (the guest boots the host's
# systemd): the units of Systemd/ installed as scripts/install does; create
# enables keel-replica@ instances, attach a keel-engine@ instance (Type=notify)
# that attaches /dev/nbdX with its udev link; kill -9 of the engine: its
# device frontend (not systemd: Restart=no) starts the unit again and the new
# engine takes the device over under a mounted
# filesystem; detach disables the engine; keel migrate on it, attached again
# with --mapper (migration-systemd-steps.sh); a backup schedule's timer fires
# and backs the detached volume up; rm removes the replicas' units, files and
# data, and both engine units' files.
# State in /var/lib/keel (ext4 on a loop device, for O_DIRECT).
. "$(dirname "$0")/common.sh"
[ "$(cat /proc/1/comm)" = systemd ] || { echo "PID 1 is not systemd"; exit 1; }
journal() {
    status=$?
    [ $status -ne 0 ] && journalctl -u keel-engine@vol -u keel-engine-alt@vol -u keel-frontend@vol --no-pager | tail -40
    (exit $status); on_exit
}
trap journal EXIT

step "install: binary, units, udev rule"
install_systemd_units

step "keel volume create: replica units"
"$KEEL" volume create vol --size 256M --replicas 2
for r in vol-r0 vol-r1; do
    echo "keel-replica@$r: $(unit_state keel-replica@$r)"
    [ "$(unit_state keel-replica@$r)" = enabled/active ] || { journalctl -u keel-replica@$r --no-pager | tail; exit 1; }
done
cat /etc/keel/replica-vol-r0.env
"$KEEL" volume show vol --json | grep -q '"runner" : "systemd"'

step "keel volume attach: the engine and frontend units"
"$KEEL" volume attach vol > "$work/attach.out" || { journalctl -u keel-engine@vol -u keel-frontend@vol --no-pager | tail -20; exit 1; }
cat "$work/attach.out"
device=$(sed -n 1p "$work/attach.out")
for unit in keel-engine@vol keel-frontend@vol; do
    echo "$unit: $(unit_state $unit)"
    [ "$(unit_state $unit)" = enabled/active ]
done
[ "$(readlink -f /dev/keel/vol)" = "$device" ] || { echo "no /dev/keel/vol for $device"; exit 1; }
fill_filesystem /dev/keel/vol

step "kill -9 of the engine: its frontend starts the unit again (systemd does not), and reconnects the device"
first=$(systemctl show -p MainPID --value keel-engine@vol)
kill -9 "$first"
for _ in $(seq 900); do
    pid=$(systemctl show -p MainPID --value keel-engine@vol)
    [ "$pid" != 0 ] && [ "$pid" != "$first" ] && [ "$(systemctl is-active keel-engine@vol)" = active ] && break
    sleep 0.1
done
restarts=$(systemctl show -p NRestarts --value keel-engine@vol)
echo "engine pid $first -> $pid, restarts by systemd: $restarts"
[ "$pid" != "$first" ] && [ "$(systemctl is-active keel-engine@vol)" = active ] || { journalctl -u keel-engine@vol -u keel-frontend@vol --no-pager | tail -20; exit 1; }
[ "$restarts" = 0 ] || { echo "systemd restarted the engine as well"; exit 1; }
for _ in $(seq 300); do journalctl -u keel-frontend@vol --no-pager -o cat | grep -q "new connection" && break; sleep 0.1; done
journalctl -u keel-frontend@vol --no-pager -o cat | grep "engine of vol started on this node" || { journalctl -u keel-frontend@vol --no-pager | tail -20; exit 1; }
journalctl -u keel-frontend@vol --no-pager -o cat | grep "new connection"
(cd /mnt/vol && sha256sum -c "$work/sums")
head -c 4M /dev/urandom > /mnt/vol/file3
sync
umount /mnt/vol

step "keel volume detach: the engine and frontend units are stopped and disabled"
"$KEEL" volume detach vol
for unit in keel-engine@vol keel-frontend@vol; do
    echo "$unit: $(unit_state $unit)"
    [ "$(unit_state $unit)" = disabled/inactive ]
done
[ "$(cat /sys/block/$(basename "$device")/size)" = 0 ]
"$KEEL" volume ls

. "$(dirname "$0")/migration-systemd-steps.sh"

step "keel backup schedule: its timer backs the detached volume up (the engine unit started for the job, then stopped)"
mkdir -p "$work/backups"
"$KEEL" backup schedule vol --name quick --target "file://$work/backups" --every 10s --keep 2
backup_unit="keel-backup:vol:quick.service"
timeout 30 "$KEEL" backup schedule ls > "$work/schedules" || { cat "$work/schedules"; echo "schedule ls failed"; exit 1; }
cat "$work/schedules"
grep -q "^vol  *quick  *every 10s" "$work/schedules" || { echo "schedule ls does not show it"; exit 1; }
# A summary in the store within 5 minutes under TCG; then the timer stopped and its last run waited for.
deadline=$(( $(date +%s) + 300 ))
until ls "$work"/backups/backups/bk-*.json >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { systemctl status "$backup_unit" --no-pager | tail -5; journalctl -u "$backup_unit" --no-pager | tail -20; exit 1; }
    sleep 1
done
systemctl stop keel-backup:vol:quick.timer
until [ "$(systemctl is-active "$backup_unit")" != activating ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "the backup service did not finish"; exit 1; }
    sleep 1
done
timeout 60 "$KEEL" backup ls --target "file://$work/backups" vol
journalctl -u "$backup_unit" --no-pager -o cat | grep -E "backup bk-|skipped|engine" | head -5
[ "$(systemctl show -p Result --value "$backup_unit")" = success ] || { journalctl -u "$backup_unit" --no-pager | tail -20; exit 1; }
[ "$(unit_state keel-engine@vol)" = disabled/inactive ] || { echo "the job left keel-engine@vol $(unit_state keel-engine@vol)"; exit 1; }
"$KEEL" backup schedule vol --name nightly --target "file://$work/backups" --on-calendar '*-*-* 02:30' --keep 7
timeout 60 "$KEEL" backup schedule rm vol --name quick
[ ! -e "/etc/systemd/system/keel-backup:vol:quick.timer" ] || { echo "the timer's unit file stayed"; exit 1; }
[ ! -e "/etc/systemd/system/$backup_unit" ] || { echo "the service's unit file stayed"; exit 1; }
timeout 30 "$KEEL" backup schedule ls > "$work/schedules"
cat "$work/schedules"
grep -q "^vol  *nightly  *on \*-\*-\* 02:30" "$work/schedules" || { echo "schedule ls does not show nightly"; exit 1; }
if grep -q quick "$work/schedules"; then echo "schedule quick is still listed"; exit 1; fi

step "keel volume rm: the replica units, their data and the volume's backup schedules go"
"$KEEL" volume rm vol
timeout 30 "$KEEL" backup schedule ls | grep -q "no backup schedule" || { echo "the volume's schedule outlived it"; exit 1; }
[ ! -e "/etc/systemd/system/keel-backup:vol:nightly.timer" ]
for r in vol-r0 vol-r1; do [ "$(unit_state keel-replica@$r)" = disabled/inactive ] || { echo "keel-replica@$r: $(unit_state keel-replica@$r)"; exit 1; }; done
[ ! -e /etc/keel/replica-vol-r0.env ] && [ ! -e /var/lib/keel/replicas/vol ] || { echo "rm left the replicas' files"; exit 1; }
for f in /etc/keel/volume-vol.env /etc/keel/volume-alt-vol.env /etc/systemd/system/keel-engine@vol.service.d \
    /etc/systemd/system/keel-engine-alt@vol.service.d; do
    [ ! -e "$f" ] || { echo "rm left $f"; exit 1; }
done
umount /var/lib/keel
echo "keel volume under systemd: complete"
