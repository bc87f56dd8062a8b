# kill -9 the engine under fio on its kernel device, start a new one: the
# kernel holds the I/O (dead-connection timeout) until the new engine hands
# over its sockets with RECONFIGURE; fio ends with no I/O error and verifies.
# fio's completion latencies show the pause.
. "$(dirname "$0")/common.sh"
for i in 0 1 2; do start_replica $i 128M; done
start_kernel_engine 128M
first=$device
step "fio randwrite + verify on $device; the engine is killed (-9) after 3 s and restarted"
fio --name=restart --filename="$device" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
    --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --eta=never \
    --time_based --runtime=12 --output="$work/fio.out" &
fio=$!
sleep 3
kill -9 "$engine"
wait "$engine" 2>/dev/null || true
start_kernel_engine 128M
[ "$device" = "$first" ] || { echo "the new engine attached $device, not $first"; exit 1; }
wait "$fio"
grep -E "IOPS|err=|clat \(|lat \(" "$work/fio.out"
grep -q "err= 0" "$work/fio.out"
grep "took over" "$work/engine.log"
kill -TERM "$engine"
wait "$engine"
echo "engine restarted under fio without I/O errors"
