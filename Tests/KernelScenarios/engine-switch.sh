# An engine switch under fio on the mounted volume, to an engine started from
# another keel binary (a live upgrade): the frontend holds the I/O above
# /dev/nbdX (its device-mapper device suspended, the I/O in flight answered),
# the old engine stops, the standby engine (its sessions to the replicas
# opened while fio ran, claiming nothing) is activated, and the frontend
# connects /dev/nbdX to it and lets the I/O go on. Before that, the same
# under fio given up (a rollback): held, resumed, the standby engine gone,
# the old engine never noticed. No I/O error, data verified; the I/O timeout
# is 30 s, so a request left to a kernel timeout would show as a completion
# latency of 30 s: the longest is reported.
. "$(dirname "$0")/common.sh"
for i in 0 1 2; do start_replica $i 256M; done
IO_TIMEOUT=30 FRONTEND_EXTRA="--mapper --control unix:$work/frontend.control" start_kernel_engine 256M
mapper=$device
control="unix:$work/frontend.control"
mkfs.ext4 -q "$mapper"
mkdir -p /mnt/vol
mount "$mapper" /mnt/vol
step "fio randwrite + verify on a file of the mounted $mapper over /dev/$nbd"
fio --name=switch --filename=/mnt/vol/fio.dat --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
    --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --eta=never \
    --time_based --runtime=24 --write_lat_log="$work/switch" --log_avg_msec=0 --output="$work/fio.out" &
fio=$!

# start_standby BINARY NAME: an engine standing by on unix:$work/NAME.sock (control NAME.control); sets $standby.
start_standby() {
    "$1" engine serve --standby --volume vol --size 256M --listen "unix:$work/$2.sock" \
        --control "unix:$work/$2.control" --replica-timeout 30 \
        --replica "unix:$work/r0.sock" --replica "unix:$work/r1.sock" --replica "unix:$work/r2.sock" 2>>"$work/$2.log" &
    standby=$!
    for _ in $(seq 600); do grep -q "standing by for" "$work/$2.log" && break; sleep 0.1; done
    grep "standing by for" "$work/$2.log"
}
now() { date +%s%N; }
ms() { echo $((($2 - $1) / 1000000)); }

step "rollback: the I/O held, then resumed with the engine it had; the standby engine stands down"
start_standby "$KEEL" rollback
sleep 2
"$KEEL" frontend hold --frontend "$control" --seconds 30
"$KEEL" frontend resume --frontend "$control"
kill -TERM "$standby"
wait "$standby"
grep "stood down: nothing was claimed" "$work/rollback.log"
"$KEEL" status --engine "unix:$work/engine.control" | grep -q "epoch 1"

step "switch to an engine of another keel binary"
cp "$KEEL" "$work/keel-upgraded"
start_standby "$work/keel-upgraded" upgraded
sleep 2
t0=$(now)
"$KEEL" frontend hold --frontend "$control" --seconds 30
t1=$(now)
kill -TERM "$engine"
wait "$engine"
t2=$(now)
"$KEEL" engine activate --engine "unix:$work/upgraded.control"
t3=$(now)
"$KEEL" frontend switch --frontend "$control" --engine "unix:$work/upgraded.sock"
t4=$(now)
echo "switch: hold $(ms $t0 $t1) ms, old engine stopped $(ms $t1 $t2) ms, activation $(ms $t2 $t3) ms, new links $(ms $t3 $t4) ms (commands included)"
engine=$standby
check_fio
"$KEEL" status --engine "unix:$work/upgraded.control" | head -2
"$KEEL" status --engine "unix:$work/upgraded.control" | grep -q "epoch 2"
grep "switched from engine" "$work/frontend.log"
longest=$(cat "$work"/switch_clat.*.log | awk -F, '{ if ($2 > m) m = $2 } END { printf "%.1f", m / 1e6 }')
echo "longest completion latency: $longest ms"
awk -v m="$longest" 'BEGIN { exit !(m < 10000) }' || { echo "a request waited $longest ms: a kernel timeout"; exit 1; }
umount /mnt/vol
stop_kernel_engine
echo "engine switched under fio without I/O errors, longest completion $longest ms"
