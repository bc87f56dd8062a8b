# kill -9 the engine under fio on its kernel device, start a new one: the
# kernel holds the I/O (dead-connection timeout) until the device frontend has
# connected to the new engine and handed the kernel those sockets with
# RECONFIGURE; fio ends with no I/O error and verifies. fio's completion
# latencies show the pause.
. "$(dirname "$0")/common.sh"
for i in 0 1 2; do start_replica $i 128M; done
start_kernel_engine 128M
first=$device
step "fio randwrite + verify on $device; the engine is killed (-9) after 3 s and restarted"
start_fio_verify 12
sleep 3
kill -9 "$engine"
wait "$engine" 2>/dev/null || true
start_plain_engine 128M
check_fio
grep "new connection" "$work/frontend.log"
[ "$(cat /sys/block/$nbd/backend)" = keel:vol ] || { echo "$first lost its backend"; exit 1; }
stop_kernel_engine
echo "engine restarted under fio without I/O errors"
