# `keel volume` with its engine on another node: node b is a network
# namespace over veth with its agent; the two replicas serve TCP on the host
# side of the link. keel node add / ls; volume create --engine-node b;
# attach runs the frontend, which has b's agent start the engine; data
# written and checksummed; show names the engine the frontend is connected
# to; the engine killed -9 on b and the frontend has b start another, the
# data reads back the same; the engine frozen (SIGSTOP) while b's agent
# answers: a write it holds waits while the agent kills it and starts another;
# detach stops the engine through the agent; rm
# of the node is refused while the volume names it; a second volume with its
# replica placed on b (--replica-node) attached, written and read back, and
# removed there by rm.
. "$(dirname "$0")/common.sh"
start_udev
export KEEL_STATE_DIR="$work/data/state"
make_node b 10.77.2.2
for i in 0 1; do
    port=$((7001 + 2 * i))
    "$KEEL" replica serve --dir "$work/data/r$i" --listen 10.77.2.1:$port --size 64M --tls off 2>>"$work/r$i.log" &
    for _ in $(seq 600); do grep -q "serving replica" "$work/r$i.log" && break; sleep 0.1; done
    grep -q "serving replica" "$work/r$i.log" || { echo "replica $i did not start"; exit 1; }
done
mkdir -p "$work/node-b"
ip netns exec b "$KEEL" node serve --listen 10.77.2.2:7800 --tls off --name b --state-dir "$work/node-b" \
    2>>"$work/node-b.log" &
for _ in $(seq 600); do grep -q "serving the agent" "$work/node-b.log" && break; sleep 0.1; done
grep -q "serving the agent" "$work/node-b.log" || { echo "the agent of node b did not start"; exit 1; }

step "keel node add, ls; volume create --engine-node b"
"$KEEL" node add b 10.77.2.2:7800
"$KEEL" node ls
"$KEEL" node ls --json | grep -q '"reachable" : true' || { echo "node b is not listed reachable"; exit 1; }
"$KEEL" volume create vol --size 64M --replica 10.77.2.1:7001 --replica 10.77.2.1:7003 --engine-node b

step "attach: the frontend has b's agent start the engine"
"$KEEL" volume attach vol > "$work/attach.out"
cat "$work/attach.out"
device=$(sed -n 1p "$work/attach.out")
[ -b "$device" ] || { echo "no device: '$device'"; exit 1; }
nbd=$(basename "$device")
"$KEEL" node health 10.77.2.2:7800
dd if=/dev/urandom of="$work/data.bin" bs=1M count=8 status=none
dd if="$work/data.bin" of="$device" bs=1M oflag=direct conv=fsync status=none
"$KEEL" volume show vol | tee "$work/show.out"
grep -q "engine on b" "$work/show.out" || { echo "show does not name node b"; exit 1; }
grep -q "frontend: connected to 10.77.2.2:10810" "$work/show.out" || { echo "show does not say the frontend is connected"; exit 1; }

step "the engine killed -9 on b: the frontend has b start another"
old=$(pgrep -f "keel engine serve --volume vol ")
kill -9 "$old"
end=$(($(date +%s) + 120))
while [ "$(date +%s)" -lt "$end" ]; do
    new=$(pgrep -f "keel engine serve --volume vol " || true)
    [ -n "$new" ] && [ "$new" != "$old" ] && "$KEEL" volume show vol | grep -q "frontend: connected" && break
    sleep 0.5
done
[ -n "$new" ] && [ "$new" != "$old" ] || { echo "no new engine on b"; cat "$work/data/state/log/"*frontend* 2>/dev/null | tail -20; exit 1; }
cmp "$work/data.bin" "$device" -n $((8 << 20)) || { echo "the data differs after the engine was replaced"; exit 1; }

step "the engine frozen on b (SIGSTOP) while b's agent answers: the agent kills it and starts another"
old=$new
kill -STOP "$old"
# A write the frozen engine holds: it waits through the restart, it does not fail.
dd if="$work/data.bin" of="$device" bs=1M count=1 oflag=direct conv=fsync status=none 2>"$work/dd.err" &
writer=$!
end=$(($(date +%s) + 240))
while [ "$(date +%s)" -lt "$end" ]; do
    new=$(pgrep -f "keel engine serve --volume vol " || true)
    [ -n "$new" ] && [ "$new" != "$old" ] && ! kill -0 "$writer" 2>/dev/null && break
    sleep 0.5
done
kill -0 "$writer" 2>/dev/null && { echo "the write held by the frozen engine did not finish"; tail -20 "$work/data/state/log/"*frontend*; exit 1; }
wait "$writer" || { echo "the write failed: $(cat "$work/dd.err")"; exit 1; }
[ -n "$new" ] && [ "$new" != "$old" ] || { echo "the frozen engine was not replaced"; exit 1; }
grep "engine of vol" "$work/data/state/log/"*frontend* | tail -2
cmp "$work/data.bin" "$device" -n $((8 << 20)) || { echo "the data differs after the frozen engine was replaced"; exit 1; }

step "detach stops the engine through the agent; the node stays in use until rm"
"$KEEL" volume detach vol
[ "$(cat /sys/block/$nbd/size)" = 0 ] || { echo "$nbd still has a size after detach"; exit 1; }
if pgrep -f "keel engine serve --volume vol " >/dev/null; then echo "the engine outlived the detach"; exit 1; fi
if "$KEEL" node rm b 2>"$work/err"; then echo "node rm b should be refused while vol names it"; exit 1; fi
cat "$work/err"
"$KEEL" volume rm vol

step "a volume with its replica placed on b (--replica-node): attach, write, read back; rm removes it there"
"$KEEL" volume create near --size 16M --replicas 1 --replica-node b
"$KEEL" volume show near | tee "$work/near.out"
grep -q "on node b" "$work/near.out" || { echo "show does not place the replica on b"; exit 1; }
near=$("$KEEL" volume attach near | head -1)
[ -b "$near" ] || { echo "no device for near: '$near'"; exit 1; }
dd if="$work/data.bin" of="$near" bs=1M count=8 oflag=direct conv=fsync status=none
cmp "$work/data.bin" "$near" -n $((8 << 20)) || { echo "near reads back differently"; exit 1; }
"$KEEL" volume detach near
"$KEEL" volume rm near
[ -z "$(ls -A "$work/node-b/placed")" ] || { echo "the replica's data outlived rm on b: $(ls "$work/node-b/placed")"; exit 1; }
if pgrep -f "keel replica serve --dir $work/node-b" >/dev/null; then echo "the replica on b outlived rm"; exit 1; fi
"$KEEL" node rm b
echo "volume with its engine on node b: attached, engine replaced, detached"
