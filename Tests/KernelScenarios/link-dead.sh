# A replica that stalls (SIGSTOP) for longer than the kernel's I/O timeout,
# under fio: the kernel times requests out and marks the engine's connections
# dead (LINK_DEAD). Without new connections the device would fail every
# request once the dead-connection timeout ran out, although the engine is
# alive; the device frontend hands the kernel new ones, the engine fails the
# stalled replica after its replica timeout, and fio ends with no I/O error and verifies.
. "$(dirname "$0")/common.sh"
for i in 0 1 2; do start_replica $i 256M; done
IO_TIMEOUT=2 REPLICA_TIMEOUT=8 DEAD_CONNECTION_TIMEOUT=12 start_kernel_engine 256M

step "fio verify; replica 2 frozen for the rest of the run after 3 s"
start_fio_verify 25
sleep 3
kill -STOP "$replica2"
check_fio
kill -CONT "$replica2"
grep -E "new connection" "$work/frontend.log" | head -3
grep -E "failed|ERR" "$work/engine.log" | head -3
grep -q "new connection" "$work/frontend.log" || { echo "the frontend never replaced a dead connection"; exit 1; }
"$KEEL" status --engine "unix:$work/engine.control" | head -1 | grep -q degraded
stop_kernel_engine
echo "dead links replaced: fio verified with a replica stalled past the I/O timeout"
