# keel migrate start --to NODE, and rows 6, 7 and 8 of the Longhorn HA
# migration matrix. Engine nodes b and c are network namespaces over veth,
# each with its node agent requiring TLS, as every link between nodes does
# (certificates of a cluster CA: the agents start their engines with TLS, to
# the device and to the replicas; the device's links are kTLS; keel migrate
# calls the agents over TLS and this host's frontend over its unix socket,
# plaintext). Replica 0 serves on this host's own address 10.77.100.1 (on the
# guest's loopback), replicas 1 and 2 on nodes d and e (namespaces too; the
# guest routes between its nodes). The volume's engine runs on an engine node
# (keel volume create --engine-node b --engine-node c), attached with --mapper
# and mounted, fio randwrite with verify running.
# An engine node goes down as a real one does: its link cut first (no FIN),
# then its processes killed; it comes back with its link up and its agent
# restarted. A replica's node goes down by its link only: nothing from it
# arrives any more, not even a FIN.
#   to c, confirm: the device switches to engine B on c; the registry puts c first.
#   to b, rollback: engine B goes from b; the volume stays on c.
#   row 7 (engine B's node down): confirm is refused with the reason; rollback succeeds.
#   row 8 (engine A's node down): the frontend fails over to B, which takes
#   over; rollback is refused with the reason; confirm answers that it runs on B.
#   row 6 (a replica's node down while B stands by): rollback with node d
#   down succeeds; confirm with node e down succeeds: its hold waits until
#   engine A has failed e (its writes there time out after
#   --replica-timeout), then B takes over from the replica that holds every
#   write, and the volume goes on degraded.
# After each: fio without I/O errors, one engine, no process on a node without
# its pid file there, the files checksummed.
. "$(dirname "$0")/migration-common.sh"
ip link set lo up
ip addr add 10.77.100.1/32 dev lo
sysctl -qw net.ipv4.ip_forward=1
net() { case $1 in b) echo 2 ;; c) echo 3 ;; d) echo 4 ;; e) echo 5 ;; esac; }
# This host's credentials in its state directory (found there by keel's commands and the frontend);
# each node's in its own.
"$KEEL" ca init --state-dir "$work/ca" >/dev/null
mkdir -p "$KEEL_STATE_DIR/tls" "$work/node-b/tls" "$work/node-c/tls"
"$KEEL" cert issue a --ip 10.77.100.1 --state-dir "$work/ca" --out "$KEEL_STATE_DIR/tls/a" >/dev/null
for node in b c; do
    "$KEEL" cert issue "$node" --ip "10.77.$(net $node).2" --state-dir "$work/ca" --out "$work/node-$node/tls/$node" >/dev/null
done
# The replicas' copies: a process naming the state directory is one keel runs (no_orphans).
cp -r "$KEEL_STATE_DIR/tls/a" "$work/replica-tls-a"
for node in d e; do
    make_node "$node" "10.77.$(net $node).2"
    ip -n "$node" route add default via "10.77.$(net $node).1"
    "$KEEL" cert issue "$node" --ip "10.77.$(net $node).2" --state-dir "$work/ca" --out "$work/replica-tls-$node" >/dev/null
done
# replica_up INDEX NODE ADDRESS: on a port and the next (its control API); node a is this host.
replica_up() {
    in=""; [ "$2" = a ] || in="ip netns exec $2"
    $in "$KEEL" replica serve --dir "$work/data/r$1" --listen "$3" --size 256M \
        --tls require --tls-certificates "$work/replica-tls-$2" 2>>"$work/r$1.log" &
    for _ in $(seq 600); do grep -q "serving replica" "$work/r$1.log" && break; sleep 0.1; done
    grep -q "serving replica" "$work/r$1.log" || { echo "replica $1 did not start"; exit 1; }
}
replica_up 0 a 10.77.100.1:7001
replica_up 1 d 10.77.4.2:7003
replica_up 2 e 10.77.5.2:7005
agent_up() {
    ip netns exec "$1" "$KEEL" node serve --listen "10.77.$(net "$1").2:7800" --name "$1" \
        --tls require --tls-certificates "$work/node-$1/tls/$1" --state-dir "$work/node-$1" 2>>"$work/node-$1.log" &
    for _ in $(seq 600); do [ "$(grep -c "serving the agent" "$work/node-$1.log")" -ge "$2" ] && return; sleep 0.1; done
    echo "the agent of node $1 did not start"; exit 1
}
for node in b c; do
    make_node "$node" "10.77.$(net $node).2"
    ip -n "$node" route add default via "10.77.$(net $node).1"
    agent_up "$node" 1
    "$KEEL" node add "$node" "10.77.$(net $node).2:7800"
done
mounted_volume --replica 10.77.100.1:7001 --replica 10.77.4.2:7003 --replica 10.77.5.2:7005 --engine-node b --engine-node c
node_down() {
    ip link set "h-$1" down
    for pid in $(ip netns pids "$1"); do kill -9 "$pid"; done
    echo "-- node $1 down"
}
replica_node_down() { ip link set "h-$1" down; echo "-- node $1 down"; }
node_up() {
    ip link set "h-$1" up
    agent_up "$1" "$(( $(grep -c "serving the agent" "$work/node-$1.log") + 1 ))"
    echo "-- node $1 up"
}
# The engine runs in namespace $1.
engine_on() {
    for pid in $(ip netns pids "$1"); do
        tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "engine serve --volume vol " && return 0
    done
    echo "the engine does not run on node $1"; exit 1
}
# Every engine and replica an agent runs has its pid file in that node's state directory.
no_node_orphans() {
    for node in b c; do
        for pid in $(pgrep -f " (engine|replica) serve .*$work/node-$node" || true); do
            cat "$work/node-$node"/run/*.pid 2>/dev/null | grep -qx "$pid" && continue
            echo "orphan process $pid on node $node: $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)"; exit 1
        done
    done
}
nodes_cell_end() { no_node_orphans; cell_end "$1"; }
# Until the migration status says $1 (at most $2 s).
wait_status() {
    end=$(($(date +%s) + $2))
    while [ "$(date +%s)" -lt "$end" ]; do "$KEEL" migrate status vol | grep -q "$1" && return; sleep 1; done
    "$KEEL" migrate status vol; echo "the migration did not reach '$1' within $2 s"; exit 1
}
engine_on b

step "to c, confirm: the device switches to engine B on node c"
fio_start
timeout 300 "$KEEL" migrate start vol --to c
status_says "phase standing by"
if grep -q interrupted "$work/status"; then echo "a migration between nodes has no process here: it is not interrupted"; exit 1; fi
expect_refusal "a migration of vol is running" migrate start vol --to b
timeout 300 "$KEEL" migrate confirm vol
status_says "migration_status success"
engine_on c
"$KEEL" volume show vol | tee "$work/show"
grep -q "connected to 10.77.3.2" "$work/show" || { echo "the device is not connected to node c"; exit 1; }
grep "switched from engine" "$KEEL_STATE_DIR"/log/keel-frontend@vol.service*.log | tail -1 | grep "kTLS" \
    || { echo "the device's links to node c are not kTLS"; exit 1; }
"$KEEL" volume show vol --json | grep -A3 '"engine_nodes"' | tr -d ' \n' | grep -q '\["c","b"\]' \
    || { echo "the registry does not put node c first"; "$KEEL" volume show vol --json; exit 1; }
nodes_cell_end to-c-confirm

step "to b, rollback: engine B goes from node b, the volume stays on c"
fio_start
timeout 300 "$KEEL" migrate start vol --to b
timeout 300 "$KEEL" migrate rollback vol
status_says "rolled back"
engine_on c
nodes_cell_end to-b-rollback

step "7: engine B's node (b) goes down: confirm refused, rollback succeeds"
fio_start
timeout 300 "$KEEL" migrate start vol --to b
node_down b
timeout 300 "$KEEL" migrate confirm vol >"$work/out" 2>"$work/err" && { echo "confirm should be refused with node b down"; exit 1; }
cat "$work/err"
grep -q "engine B of vol is not ready" "$work/err" || { echo "the refusal does not say engine B is not ready"; exit 1; }
status_says "standing by"
timeout 300 "$KEEL" migrate rollback vol
status_says "rolled back"
engine_on c
nodes_cell_end 7-confirm-refused-rollback
node_up b

step "8: engine A's node (c) goes down: the volume fails over to engine B on b; rollback refused; confirm answers it runs on B"
fio_start
timeout 300 "$KEEL" migrate start vol --to b
node_down c
wait_status "engine A was lost" 180
engine_on b
timeout 300 "$KEEL" migrate rollback vol >"$work/out" 2>"$work/err" && { echo "rollback should be refused with node c down"; exit 1; }
cat "$work/err"
grep -q "node c does not answer" "$work/err" || { echo "the refusal does not say node c does not answer"; exit 1; }
timeout 300 "$KEEL" migrate confirm vol | tee "$work/out"
grep -q "already runs on engine B" "$work/out" || { echo "confirm does not say it runs on B"; exit 1; }
status_says "migration_status success"
nodes_cell_end 8-rollback-refused-confirm
node_up c

step "6 rollback: node d (replica 1) goes down while engine B stands by"
fio_start
timeout 300 "$KEEL" migrate start vol --to c
replica_node_down d
timeout 300 "$KEEL" migrate rollback vol
status_says "rolled back"
engine_on b
nodes_cell_end 6-rollback

step "6 confirm: node e (replica 2) goes down while engine B stands by"
fio_start
timeout 300 "$KEEL" migrate start vol --to c
replica_node_down e
began=$(date +%s)
timeout 300 "$KEEL" migrate confirm vol
echo "confirm took $(( $(date +%s) - began )) s"
status_says "migration_status success"
engine_on c
nodes_cell_end 6-confirm

umount /mnt/vol
"$KEEL" volume detach vol
[ -z "$(engines)" ] || { echo "an engine outlived the detach"; exit 1; }
echo "migration matrix: cells$cells passed"
