# kill -9 the engine under fio on its kernel device, start a new one: the
# kernel holds the I/O (dead-connection timeout) until the new engine hands
# over its sockets with RECONFIGURE; fio ends with no I/O error and verifies.
# fio's completion latencies show the pause.
. "$(dirname "$0")/common.sh"
for i in 0 1 2; do start_replica $i 128M; done
start_kernel_engine 128M
first=$device
step "fio randwrite + verify on $device; the engine is killed (-9) after 3 s and restarted"
start_fio_verify 12
sleep 3
kill -9 "$engine"
wait "$engine" 2>/dev/null || true
start_kernel_engine 128M
[ "$device" = "$first" ] || { echo "the new engine attached $device, not $first"; exit 1; }
check_fio
grep "took over" "$work/engine.log"
kill -TERM "$engine"
wait "$engine"
echo "engine restarted under fio without I/O errors"
