# Row 6 of the Longhorn HA migration matrix: one replica's node goes down
# during a migration. The three replicas serve on nodes c, d and e (network
# namespaces over veth, plain TCP); the volume's engine runs on this host
# (keel volume create --replica ADDR), attached with --mapper and mounted, fio
# randwrite with verify running. A node goes down by its link: nothing from it
# arrives any more, not even a FIN. Rollback with node d down: succeeds. Confirm
# with node e down: the hold waits until engine A has failed e (its writes
# there time out after --replica-timeout), then B takes over from the replicas
# that hold every write, and the volume goes on degraded. After each: fio
# without I/O errors, one engine, the files checksummed.
. "$(dirname "$0")/migration-common.sh"
i=0
for node in c d e; do
    i=$((i + 1))
    make_node "$node" "10.77.1$i.2"
    ip netns exec "$node" "$KEEL" replica serve --dir "$work/data/r-$node" --listen "10.77.1$i.2:7001" --size 256M \
        --tls off 2>>"$work/r-$node.log" &
    for _ in $(seq 600); do grep -q "serving replica" "$work/r-$node.log" && break; sleep 0.1; done
    grep -q "serving replica" "$work/r-$node.log" || { echo "the replica on node $node did not start"; exit 1; }
done
mounted_volume --replica 10.77.11.2:7001 --replica 10.77.12.2:7001 --replica 10.77.13.2:7001
node_down() { ip link set "h-$1" down; echo "-- node $1 down"; }
took() { echo "$(( $(date +%s) - $1 )) s"; }

step "6 rollback: node d goes down while engine B stands by"
fio_start
"$KEEL" migrate start vol --binary "$work/keel-upgraded"
node_down d
"$KEEL" migrate rollback vol
status_says "rolled back"
cell_end 6-rollback

step "6 confirm: node e goes down while engine B stands by"
fio_start
"$KEEL" migrate start vol --binary "$work/keel-upgraded"
node_down e
began=$(date +%s)
"$KEEL" migrate confirm vol
echo "confirm took $(took "$began")"
status_says "migration_status success"
tr '\0' ' ' < "/proc/$(engines)/cmdline" | grep -q keel-upgraded || { echo "the engine is not B"; exit 1; }
cell_end 6-confirm

umount /mnt/vol
"$KEEL" volume detach vol
[ -z "$(engines)" ] || { echo "an engine outlived the detach"; exit 1; }
echo "migration matrix: cells$cells passed"
