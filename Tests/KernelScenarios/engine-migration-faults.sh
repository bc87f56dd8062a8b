# The Longhorn HA migration matrix's rows that one node can play, each for
# confirm and for rollback, on a volume of keel volume attached with --mapper,
# mounted, fio randwrite with verify running through each cell:
#   1. engine B crashes while standing by: confirm is refused with the reason,
#      the volume stays on A; rollback succeeds.
#   3. engine A crashes: the device frontend's failover hands the volume to B;
#      confirm answers that it runs on B; rollback starts A again and switches
#      the device back.
#   2. engine B loses every replica link while standing by (fault point
#      drop-standby-links): confirm is refused with the reason, the volume
#      stays on A; rollback succeeds.
#   5. the volume is degraded (a replica killed): confirm and rollback succeed.
# After every cell: fio without I/O errors, one engine process, no orphan
# process, the record's status as expected, the files checksummed.
. "$(dirname "$0")/migration-common.sh"
mounted_volume --replicas 3

step "1 confirm: engine B crashes while standing by"
fio_start
"$KEEL" migrate start vol --binary "$work/keel-upgraded"
pkill -9 -f "keel-upgraded engine serve"
if "$KEEL" migrate confirm vol 2>"$work/err"; then echo "confirm succeeded without B"; exit 1; fi
cat "$work/err"; grep -q "not ready" "$work/err"
"$KEEL" migrate rollback vol
status_says "migration_status error"
cell_end 1-confirm

step "1 rollback: engine B crashes while standing by"
fio_start
"$KEEL" migrate start vol --binary "$work/keel-upgraded"
pkill -9 -f "keel-upgraded engine serve"
"$KEEL" migrate rollback vol
status_says "rolled back"
cell_end 1-rollback

step "3 confirm: engine A crashes; the frontend hands the volume to B"
fio_start
"$KEEL" migrate start vol --binary "$work/keel-upgraded"
a=$(pgrep -f "^$KEEL engine serve --volume vol ")
kill -9 "$a"
for _ in $(seq 900); do "$KEEL" migrate status vol | grep -q "engine A was lost" && break; sleep 0.2; done
status_says "running on engine B (engine A was lost)"
"$KEEL" migrate confirm vol | tee "$work/confirm"
grep -q "already runs on engine B" "$work/confirm"
status_says "migration_status success"
tr '\0' ' ' < "/proc/$(engines)/cmdline" | grep -q keel-upgraded || { echo "the engine is not B"; exit 1; }
cell_end 3-confirm

step "3 rollback: engine A (now the upgraded one) crashes; rollback brings back this keel's engine"
fio_start
"$KEEL" migrate start vol
a=$(engines | head -1)
kill -9 "$a"
for _ in $(seq 900); do "$KEEL" migrate status vol | grep -q "engine A was lost" && break; sleep 0.2; done
status_says "running on engine B (engine A was lost)"
"$KEEL" migrate rollback vol
status_says "engine A was started again"
cell_end 3-rollback

step "2 confirm and rollback: engine B loses every replica link while standing by"
fio_start
KEEL_FAULTS=drop-standby-links=1 "$KEEL" migrate start vol --binary "$work/keel-upgraded"
for _ in $(seq 100); do grep -q "drop-standby-links" "$KEEL_STATE_DIR"/log/keel-engine@vol.service.next.log && break; sleep 0.1; done
if "$KEEL" migrate confirm vol 2>"$work/err"; then echo "confirm succeeded with B cut off"; exit 1; fi
cat "$work/err"; grep -q "lost its sessions" "$work/err"
status_says "phase standing by"
"$KEEL" migrate rollback vol
status_says "rolled back"
cell_end 2-confirm
fio_start
KEEL_FAULTS=drop-standby-links=1 "$KEEL" migrate start vol --binary "$work/keel-upgraded"
sleep 2
"$KEEL" migrate rollback vol
status_says "rolled back"
cell_end 2-rollback

step "5 confirm and rollback: the volume degraded (a replica killed)"
pkill -9 -f "replica serve --dir $KEEL_STATE_DIR/replicas/vol/r2"
fio_start
"$KEEL" migrate start vol --binary "$work/keel-upgraded"
"$KEEL" migrate rollback vol
status_says "rolled back"
cell_end 5-rollback
fio_start
"$KEEL" migrate start vol --binary "$work/keel-upgraded"
sleep 2
"$KEEL" migrate confirm vol
status_says "migration_status success"
cell_end 5-confirm

umount /mnt/vol
"$KEEL" volume detach vol
[ -z "$(engines)" ] || { echo "an engine outlived the detach"; exit 1; }
echo "migration matrix: cells$cells passed"
