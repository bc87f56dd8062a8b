# The device frontend with its engine on another node (a network namespace
# over veth, plain TCP): fio with crc32c verification on the device while
# the engine is killed (-9) and started again on its node: the kernel holds
# the I/O, the frontend reconnects, fio ends with no I/O error. Then the
# engine node's link is cut with a request in flight (no FIN reaches the
# host): the kernel times the request out (--io-timeout), the frontend cannot
# reach the engine until the link is back with a new engine, then reconnects;
# fio again ends with no I/O error.
. "$(dirname "$0")/common.sh"
for i in 0 1 2; do start_replica $i 128M; done
make_node enode 10.77.0.2

start_remote_engine() {
    ip netns exec enode "$KEEL" engine serve --volume vol --size 128M --listen 10.77.0.2:10809 --tls off \
        --replica "unix:$work/r0.sock" --replica "unix:$work/r1.sock" --replica "unix:$work/r2.sock" \
        --replica-timeout 30 2>>"$work/engine.log" &
    engine=$!
    for _ in $(seq 300); do grep -q "serving volume" "$work/engine.log" && break; sleep 0.1; done
}

start_remote_engine
IO_TIMEOUT=4 DEAD_CONNECTION_TIMEOUT=60 start_frontend 10.77.0.2:10809

step "fio verify on $device; the engine is killed (-9) after 3 s and started again on its node"
start_fio_verify 12
sleep 3
kill -9 "$engine"
wait "$engine" 2>/dev/null || true
: > "$work/engine.log"
start_remote_engine
check_fio
grep "new connection" "$work/frontend.log"

step "the engine node's link is cut under fio; the engine is killed and the link comes back with a new one"
answered=$(grep -c "does not answer" "$work/frontend.log" || true)
start_fio_verify 20
sleep 3
ip link set h-enode down
kill -9 "$engine"
wait "$engine" 2>/dev/null || true
# The kernel times the requests out and the frontend tries an engine it cannot reach.
for _ in $(seq 300); do [ "$(grep -c "does not answer" "$work/frontend.log")" -gt "$answered" ] && break; sleep 0.1; done
grep "does not answer" "$work/frontend.log" | tail -1
ip link set h-enode up
: > "$work/engine.log"
start_remote_engine
check_fio
grep "new connection" "$work/frontend.log" | tail -2
kill -TERM "$frontend"
wait "$frontend"
[ "$(cat /sys/block/$nbd/size)" = 0 ] || { echo "$nbd still has a size after the frontend stopped"; exit 1; }
kill -TERM "$engine"
wait "$engine"
echo "remote engine: fio verified through a restart and a cut link"
