# keel migrate on a volume of keel volume (no systemd), attached with --mapper
# (a real udevd: /dev/keel/vol points at the device-mapper device), mounted,
# fio randwrite with verify running throughout: start engine B from a copied
# keel binary (a live upgrade), status, a second start refused; rollback
# (engine A never noticed); start again and confirm under fio: no I/O error,
# data verified, no request left to the kernel's I/O timeout (15 s); status
# success, one row in volume ls; detach stops engine B (now the volume's
# engine); attach again and the files are there.
# Then, on the same volume, the Longhorn HA migration matrix's rows that one
# node can play, each for confirm and for rollback, fio randwrite with verify
# running through each cell:
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

engine_pid() { pgrep -f "engine serve --volume vol " | head -1; }

step "create, attach --mapper, mount"
"$KEEL" volume create vol --size 256M --replicas 3
"$KEEL" volume attach vol --mapper --io-timeout 15 | tee "$work/attach.out"
[ "$(sed -n 1p "$work/attach.out")" = /dev/mapper/keel-vol ] || { echo "attach --mapper did not print the mapper device"; exit 1; }
for _ in $(seq 100); do [ "$(readlink -f /dev/keel/vol)" = "$(readlink -f /dev/mapper/keel-vol)" ] && break
    case "$(readlink -f /dev/keel/vol)" in /dev/dm-*) break;; esac; sleep 0.1; done
echo "/dev/keel/vol -> $(readlink -f /dev/keel/vol)"
case "$(readlink -f /dev/keel/vol)" in /dev/dm-*) ;; *) echo "/dev/keel/vol is not the mapper device"; exit 1;; esac
expect_refusal "no migration" migrate confirm vol
fill_filesystem /dev/keel/vol
fio --name=migrate --filename=/mnt/vol/fio.dat --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
    --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --eta=never \
    --time_based --runtime=40 --write_lat_log="$work/migrate" --log_avg_msec=0 --output="$work/fio.out" &
fio=$!
a=$(engine_pid)

step "start, status, a second start refused, rollback"
"$KEEL" migrate start vol --binary "$work/keel-upgraded"
"$KEEL" migrate status vol | tee "$work/status"
grep -q "migration_status migrating" "$work/status" && grep -q "phase standing by, 50%" "$work/status"
expect_refusal "is running" migrate start vol
"$KEEL" volume ls | tee "$work/ls"
[ "$(grep -c "^vol " "$work/ls")" = 1 ] || { echo "volume ls shows vol more than once"; exit 1; }
"$KEEL" migrate rollback vol
"$KEEL" migrate status vol | grep "migration_status error" 
[ "$(engine_pid)" = "$a" ] || { echo "engine A changed on rollback"; exit 1; }
[ "$(pgrep -fc "engine serve --volume vol ")" = 1 ] || { echo "engine B outlived the rollback"; exit 1; }
expect_refusal "nothing to roll back" migrate rollback vol

step "start again, confirm under fio"
"$KEEL" migrate start vol --binary "$work/keel-upgraded"
sleep 3
"$KEEL" migrate confirm vol | tee "$work/confirm"
"$KEEL" migrate status vol | tee "$work/status"
grep -q "migration_status success" "$work/status" && grep -q "phase done, 100%" "$work/status"
b=$(engine_pid)
[ "$b" != "$a" ] && ! kill -0 "$a" 2>/dev/null || { echo "engine A still runs"; exit 1; }
tr '\0' ' ' < /proc/$b/cmdline | grep -q keel-upgraded || { echo "the engine is not B's binary"; exit 1; }
[ "$(pgrep -fc "engine serve --volume vol ")" = 1 ] || { echo "more than one engine"; exit 1; }
check_fio
longest=$(cat "$work"/migrate_clat.*.log | awk -F, '{ if ($2 > m) m = $2 } END { printf "%.1f", m / 1e6 }')
echo "longest completion latency: $longest ms"
awk -v m="$longest" 'BEGIN { exit !(m < 10000) }' || { echo "a request waited $longest ms: a kernel timeout"; exit 1; }
cat "$KEEL_STATE_DIR"/log/keel-migrations.log

step "detach stops engine B; attach again"
umount /mnt/vol
"$KEEL" volume detach vol
[ -z "$(engine_pid)" ] || { echo "an engine outlived the detach"; exit 1; }
[ ! -e /dev/mapper/keel-vol ] || { echo "the mapper device outlived the detach"; exit 1; }
"$KEEL" volume attach vol --mapper --io-timeout 15
mount /dev/keel/vol /mnt/vol
(cd /mnt/vol && sha256sum -c "$work/sums")
echo "keel migrate: engine migrated under fio without I/O errors, longest completion $longest ms"

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
"$KEEL" volume rm vol
echo "migration matrix: cells$cells passed"
