# Part of volume-systemd.sh (sourced there, in the same guest boot): keel
# migrate on a volume systemd runs, detached when this begins. Its engine is
# keel-engine@vol; one unit cannot run twice, so engine B starts as the
# volume's other engine unit, keel-engine-alt@vol, standing by, here from a
# copied keel binary (a live upgrade: a drop-in replaces the unit's
# ExecStart). The volume is attached with --mapper and mounted, fio randwrite
# with verify running. Rollback: B's unit stopped, disabled and its files
# gone, A never noticed. Confirm under fio: keel-engine-alt@vol is the
# volume's engine (the registry says so, its environment file is an
# engine's); kill -9 of it, and the frontend starts that unit again (still the
# new binary). A second migration, with this keel, back to keel-engine@vol,
# with engine A killed while B stands by: B takes over, A's unit is disabled,
# confirm answers that the volume runs on B. Detach disables both engine
# units; keel volume rm (in volume-systemd.sh) removes both units' files.
expect_unit() { [ "$(unit_state "$1")" = "$2" ] || { echo "$1 is $(unit_state "$1"), not $2"; exit 1; }; }
main_pid() { systemctl show -p MainPID --value "$1"; }
fio_start() { fio_rounds_start /mnt/vol/fio.dat; }
status_says() { "$KEEL" migrate status vol | tee "$work/status" | head -3; grep -q "$1" "$work/status" || { echo "status lacks '$1'"; exit 1; }; }
# Not under /tmp: the units have a private /tmp.
install -D -m 0755 "$KEEL" /usr/local/lib/keel-upgraded/keel

step "keel migrate: attach --mapper, mount"
"$KEEL" volume attach vol --mapper --io-timeout 15
expect_unit keel-engine@vol enabled/active
mount /dev/keel/vol /mnt/vol
(cd /mnt/vol && sha256sum -c --quiet "$work/sums")

step "start: engine B as keel-engine-alt@vol from another binary, standing by; rollback"
fio_start
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
fio_rounds_stop

step "confirm under fio: keel-engine-alt@vol is the volume's engine"
fio_start
"$KEEL" migrate start vol --binary /usr/local/lib/keel-upgraded/keel
"$KEEL" migrate confirm vol
status_says "migration_status success"
expect_unit keel-engine@vol disabled/inactive
expect_unit keel-engine-alt@vol enabled/active
b=$(main_pid keel-engine-alt@vol)
tr '\0' ' ' < "/proc/$b/cmdline" | grep -q keel-upgraded || { echo "the engine is not B's binary"; exit 1; }
if grep -q -- "--standby" /etc/keel/volume-alt-vol.env; then echo "engine B's unit would start standing by again"; exit 1; fi
"$KEEL" volume show vol | head -3
fio_rounds_stop
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
fio_start
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
fio_rounds_stop

step "keel migrate: detach disables both engine units"
umount /mnt/vol
"$KEEL" volume detach vol
expect_unit keel-engine@vol disabled/inactive
expect_unit keel-engine-alt@vol disabled/inactive
echo "keel migrate under systemd: complete"
