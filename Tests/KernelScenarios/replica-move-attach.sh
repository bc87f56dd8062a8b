# Detach and attach while a volume's replicas move (keel volume move; the
# Cinder async-migration seed keeps a volume usable while it moves): a
# detached volume of two replicas here starts moving to nodes n1 and n2
# (network namespaces with their agents), its engine started for the move
# with no device; the mover is held at a test stop point once it copies
# (the engine's copy goes on); `keel volume attach` takes that engine over
# (the same process serves /dev/nbdX) and the device reads and writes;
# detach leaves the engine to the move; attach again; the move then goes on
# to its end while the device is written; the replicas are then n1's and
# n2's, the device holds every write, detach stops the engine, and the data
# reads back the same through a new engine.
. "$(dirname "$0")/common.sh"
start_udev
export KEEL_STATE_DIR="$work/data/state"
for n in 1 2; do
    make_node "n$n" "10.77.1$n.2"
    mkdir -p "$work/data/node-n$n"
    ip netns exec "n$n" "$KEEL" node serve --listen "10.77.1$n.2:7800" --tls off --name "n$n" \
        --state-dir "$work/data/node-n$n" 2>>"$work/node-n$n.log" &
    for _ in $(seq 600); do grep -q "serving the agent" "$work/node-n$n.log" && break; sleep 0.1; done
    grep -q "serving the agent" "$work/node-n$n.log" || { echo "the agent of n$n did not start"; exit 1; }
    "$KEEL" node add "n$n" "10.77.1$n.2:7800"
done

engine_pid() { pgrep -f "keel engine serve --volume vol " || true; }
migration() { "$KEEL" migrate status vol --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["migration_status"])'; }
state() { "$KEEL" volume show vol --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])'; }
replica_nodes() {
    "$KEEL" volume show vol --json | python3 -c 'import json, sys; print(" ".join(sorted(str(r["node"]) for r in json.load(sys.stdin)["replicas"])))'
}
# write_at FILE MIB: FILE's bytes to the device at MIB MiB, and to the expected image.
write_at() {
    dd if="$1" of="$device" bs=1M seek="$2" oflag=direct status=none
    dd if="$1" of="$work/expected" bs=1M seek="$2" conv=notrunc status=none
}
check_device() { cmp -n $((24 << 20)) "$work/expected" "$device" || { echo "the device does not hold every write ($1)"; exit 1; }; }

step "create, attach, write, detach"
"$KEEL" volume create vol --size 32M --replicas 2
truncate -s 32M "$work/expected"
device=$("$KEEL" volume attach vol | head -1)
head -c 8M /dev/urandom > "$work/a"
write_at "$work/a" 0
"$KEEL" volume detach vol
[ -z "$(engine_pid)" ] || { echo "an engine runs after detach"; exit 1; }

step "move the detached volume's replicas to n1 and n2; the mover held once it copies"
KEEL_FAULTS=slow-rebuild=0.1 KEEL_TEST_PAUSE_AT=move-copy KEEL_TEST_PAUSE_FILE="$work/pause" \
    "$KEEL" volume move vol --replica-node n1 --replica-node n2 --json > "$work/move.out" 2>&1 &
move=$!
for _ in $(seq 1200); do [ -e "$work/pause" ] && break; sleep 0.1; done
[ -e "$work/pause" ] || { cat "$work/move.out"; echo "the move never reached its stop point"; exit 1; }
move_engine=$(engine_pid)
[ -n "$move_engine" ] || { echo "no engine while the move copies"; exit 1; }
[ "$(migration)" = migrating_attachable ] || { echo "migration status: $(migration)"; exit 1; }
[ "$(state)" = "engine running, frontend disabled" ] || { echo "state during the move: $(state)"; exit 1; }

step "attach during the move: the attach takes the move's engine over"
device=$("$KEEL" volume attach vol | head -1)
[ -b "$device" ] || { echo "no device: '$device'"; exit 1; }
[ "$(engine_pid)" = "$move_engine" ] || { echo "the attach started another engine ($(engine_pid), was $move_engine)"; exit 1; }
check_device "attached during the move"
head -c 4M /dev/urandom > "$work/b"
write_at "$work/b" 8
check_device "written during the move"

step "detach during the move: the engine stays for the move"
"$KEEL" volume detach vol
[ "$(engine_pid)" = "$move_engine" ] || { echo "detach stopped the move's engine"; exit 1; }
[ "$(migration)" = migrating_attachable ] || { echo "migration status after detach: $(migration)"; exit 1; }

step "attach again, let the move go on, write while it copies; it ends in success"
device=$("$KEEL" volume attach vol | head -1)
[ "$(engine_pid)" = "$move_engine" ] || { echo "the second attach started another engine"; exit 1; }
rm "$work/pause"
head -c 4M /dev/urandom > "$work/c"
write_at "$work/c" 16
wait "$move" || { cat "$work/move.out"; echo "the move failed"; exit 1; }
tail -1 "$work/move.out"
[ "$(migration)" = success ] || { echo "migration status at the end: $(migration)"; exit 1; }
[ "$(replica_nodes)" = "n1 n2" ] || { echo "replicas on: $(replica_nodes)"; exit 1; }
[ "$(engine_pid)" = "$move_engine" ] || { echo "the attached volume's engine did not outlive the move"; exit 1; }
check_device "after the move"

step "detach stops the engine; a new engine over the moved replicas reads the same"
"$KEEL" volume detach vol
[ -z "$(engine_pid)" ] || { echo "an engine runs after detach"; exit 1; }
device=$("$KEEL" volume attach vol | head -1)
check_device "through a new engine over n1 and n2"
"$KEEL" volume detach vol
"$KEEL" volume rm vol
echo "replica move with detach and attach: ok"
