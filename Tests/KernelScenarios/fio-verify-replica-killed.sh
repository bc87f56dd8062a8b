# fio with crc32c verification on the volume's kernel device (libaio,
# direct=1); one replica is killed with -9 half-way: no I/O error, the data
# verifies, the volume is degraded. Replica 1 lives on the guest's tmpfs
# (Linux 6.1's tmpfs refuses O_DIRECT): it falls back to buffered I/O with
# fdatasync and says so once.
. "$(dirname "$0")/common.sh"
mkdir -p "$work/tmpfs"
mount -t tmpfs -o size=512M tmpfs "$work/tmpfs"
start_replica 0 128M
start_replica 1 128M "$work/tmpfs"
start_replica 2 128M
start_kernel_engine 128M
step "fio randwrite + verify on $device, replica 2 killed after 3 s"
start_fio_verify 8
sleep 3
kill -9 "$replica2"
check_fio
"$KEEL" status --engine "unix:$work/engine.control" | tee "$work/status"
grep -q "degraded" "$work/status"
stop_kernel_engine
grep "O_DIRECT" "$work/r1.log"
[ "$(grep -c "refuses O_DIRECT" "$work/r1.log")" = 1 ]
if grep -q "O_DIRECT" "$work/r0.log"; then echo "replica 0 (ext4) did not use O_DIRECT"; exit 1; fi
echo "fio verified with a replica killed"
