# fio with crc32c verification on the volume's kernel device (libaio,
# direct=1); one replica is killed with -9 half-way: no I/O error, the data
# verifies, the volume is degraded.
. "$(dirname "$0")/common.sh"
for i in 0 1 2; do start_replica $i 128M; done
start_kernel_engine 128M
step "fio randwrite + verify on $device, replica 2 killed after 3 s"
fio --name=kernel --filename="$device" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
    --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --eta=never \
    --time_based --runtime=8 --output="$work/fio.out" &
fio=$!
sleep 3
kill -9 "$replica2"
wait "$fio"
grep -E "IOPS|err=" "$work/fio.out"
grep -q "err= 0" "$work/fio.out"
"$KEEL" status --engine "unix:$work/engine.control" | tee "$work/status"
grep -q "degraded" "$work/status"
kill -TERM "$engine"
wait "$engine"
echo "fio verified with a replica killed"
