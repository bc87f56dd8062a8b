# Engine failover across nodes. Three engine nodes (network namespaces over
# veth, each with its node agent); the replicas on the guest's own namespace;
# the device frontend on the host asks the agents for the volume's engine in
# order. ext4 on /dev/keel/vol (udev's link), files checksummed, fio with crc32c verification
# on a file in it. Node A goes down (its link cut first, as a real node loss
# sends no FIN, then its processes killed): the kernel times the requests out,
# the frontend cannot reach A's engine nor its agent and has node B start one.
# Then split brain: B's engine frozen (SIGSTOP) with writes in flight and the
# host's traffic to B blackholed (B keeps its replica links); the frontend
# has C start an engine, which claims the replicas with a newer epoch; B
# resumes (SIGCONT) and is fenced: none of its writes lands (one more, to
# the superblock, through a client on its own node, is refused too). fio ends
# with no I/O error, fsck finds nothing and the checksums match.
# The engines' replica timeout is long (120 s): b is frozen for longer than
# 30 s under a loaded TCG guest, and on resuming it must send its writes to
# the replicas (and be refused), not give the replicas up as silent.
. "$(dirname "$0")/common.sh"
start_udev
for i in 0 1 2; do start_replica $i 128M; done
for node in a b c; do
    case $node in a) net=1 ;; b) net=2 ;; c) net=3 ;; esac
    make_node $node 10.77.$net.2
    mkdir -p "$work/node-$node"
    ip netns exec $node "$KEEL" node serve --listen 10.77.$net.2:7800 --tls off --name $node \
        --state-dir "$work/node-$node" 2>>"$work/node-$node.log" &
    for _ in $(seq 300); do grep -q "serving the agent" "$work/node-$node.log" && break; sleep 0.1; done
    grep -q "serving the agent" "$work/node-$node.log" || { echo "the agent of node $node did not start"; exit 1; }
done
"$KEEL" node health 10.77.1.2:7800

step "the frontend has node a start the engine"
: > "$work/frontend.out"
"$KEEL" frontend serve --volume vol --size 128M --connections 2 --io-timeout 15 --connect-timeout 2 \
    --dead-connection-timeout 120 --engine-node 10.77.1.2:7800 --engine-node 10.77.2.2:7800 \
    --engine-node 10.77.3.2:7800 --replica "unix:$work/r0.sock" --replica "unix:$work/r1.sock" \
    --replica "unix:$work/r2.sock" --replica-timeout 120 --log-level info \
    >"$work/frontend.out" 2>>"$work/frontend.log" &
frontend=$!
for _ in $(seq 1200); do grep -q /dev/nbd "$work/frontend.out" && break; sleep 0.1; done
device=$(cat "$work/frontend.out")
[ -b "$device" ] || { echo "no device from the frontend: '$device'"; exit 1; }
grep "started on node" "$work/frontend.log"
# udev links the device by its backend identifier, which the kernel sets just after the size.
nbd=$(basename "$device")
for _ in $(seq 100); do
    udevadm settle --timeout=30
    [ "$(readlink -f /dev/keel/vol)" = "$device" ] && break
    echo change > "/sys/block/$nbd/uevent"
    sleep 0.1
done
[ "$(readlink -f /dev/keel/vol)" = "$device" ] || { echo "udev gave no /dev/keel/vol for $device"; exit 1; }
fill_filesystem /dev/keel/vol
"$KEEL" node health 10.77.1.2:7800

# wait_for_log FILE PATTERN SECONDS (by the clock: under TCG a loop's own steps take time)
wait_for_log() {
    end=$(($(date +%s) + $3))
    while [ "$(date +%s)" -lt "$end" ]; do grep -q "$2" "$1" && return 0; sleep 0.2; done
    grep -q "$2" "$1" || { echo "no '$2' in $1 within $3 s"; exit 1; }
}

step "fio verify in the file system; node a goes down (link cut, then kill -9)"
fio --name=failover --filename=/mnt/vol/fio.dat --size=24M --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --eta=never \
    --time_based --runtime=100 --write_lat_log="$work/failover" --log_avg_msec=0 --output="$work/fio.out" &
fio=$!
start=$(date +%s%3N)
since() { echo "+$(( ($(date +%s%3N) - start) / 1000 )) s"; }
sleep 4
ip link set h-a down
echo "node a cut at $(since)"
ip netns pids a | xargs -r kill -9
wait_for_log "$work/frontend.log" "moves from 10.77.1.2" 150
echo "the engine moved to b by $(since)"
# Writes complete through b (the device's own count) before b is the one lost: two separate pauses.
before=$(awk '{ print $5 }' /sys/block/$nbd/stat)
end=$(($(date +%s) + 120))
while [ "$(awk '{ print $5 }' /sys/block/$nbd/stat)" -lt $((before + 50)) ] && [ "$(date +%s)" -lt "$end" ]; do sleep 0.2; done
echo "writes complete through b by $(since)"
grep -E "does not answer|moves from|started on node" "$work/frontend.log" | tail -4

ln -s "$work/node-b/log/keel-engine@vol.service.log" "$work/old-engine.log"   # shown if the scenario fails
step "split brain: b's engine frozen with writes in flight, the host's traffic to b blackholed"
# Frozen first: the requests the kernel keeps sending wait in its socket, unread, for when it resumes.
old=$(cat "$work/node-b/run/keel-engine@vol.service.pid")
kill -STOP "$old"
ip rule add to 10.77.2.2 iif lo blackhole
echo "b frozen and cut off at $(since)"
wait_for_log "$work/frontend.log" "moves from 10.77.2.2" 150
echo "the engine moved to c by $(since)"
grep -E "moves from|started on node" "$work/frontend.log" | tail -2
kill -CONT "$old"
# The old engine, resumed, writes the volume's first block (ext4's superblock
# is in it) on behalf of a client of its own node: the replicas refuse it.
if ip netns exec b nbdsh -u nbd://10.77.2.2:10809/vol -c 'h.pwrite(b"\xff" * 4096, 0)' 2>"$work/old-write.err"; then
    echo "the fenced engine acknowledged a write"; exit 1
fi
tail -1 "$work/old-write.err"
wait_for_log "$work/old-engine.log" "fenced" 30
grep -m1 "fenced" "$work/old-engine.log"
check_fio
sync
umount /mnt/vol
fsck.ext4 -fn /dev/keel/vol >/dev/null
mount /dev/keel/vol /mnt/vol
(cd /mnt/vol && sha256sum -c "$work/sums")
umount /mnt/vol
# The pauses: the longest gaps between two completed writes, from fio's latency log (ms since fio's start).
sort -n -t, -k1,1 "$work/failover_clat.1.log" | awk -F, '{ t = $1 / 1000; if (NR > 1 && t - last > 1) printf "%.1f %.1f\n", t - last, last; last = t }' \
    | sort -rn | head -3 | while read gap from; do echo "no write completed for $gap s (from +$from s of fio's clock)"; done
kill -TERM "$frontend"
wait "$frontend"
echo "engine failover: fio verified through a node loss and a fenced split brain"
