# keel migrate on a volume of keel volume (no systemd), attached with --mapper
# (a real udevd: /dev/keel/vol points at the device-mapper device), mounted,
# fio randwrite with verify running throughout: start engine B from a copied
# keel binary (a live upgrade), status, a second start refused; rollback
# (engine A never noticed); start again and confirm under fio: no I/O error,
# data verified, no request left to the 30 s kernel timeout; status success,
# one row in volume ls; detach stops engine B (now the volume's engine);
# attach again and the files are there.
. "$(dirname "$0")/common.sh"
start_udev
export KEEL_STATE_DIR="$work/data/state"

engine_pid() { pgrep -f "engine serve --volume vol " | head -1; }

step "create, attach --mapper, mount"
"$KEEL" volume create vol --size 256M --replicas 3
"$KEEL" volume attach vol --mapper | tee "$work/attach.out"
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
cp "$KEEL" "$work/keel-upgraded"
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
"$KEEL" volume attach vol --mapper
mount /dev/keel/vol /mnt/vol
(cd /mnt/vol && sha256sum -c "$work/sums")
umount /mnt/vol
"$KEEL" volume detach vol
"$KEEL" volume rm vol
echo "keel migrate: engine migrated under fio without I/O errors, longest completion $longest ms"
