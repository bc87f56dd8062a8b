# Snapshots of a mounted ext4 under fio: one taken as it is (crash-consistent:
# its journal replayed, e2fsck -fn passes) and one with --freeze (fsfreeze
# around it: e2fsck -fn passes with no replay). Each is copied with nbdcopy
# from `keel snapshot export`.
. "$(dirname "$0")/common.sh"
for i in 0 1 2; do start_replica $i 256M; done
start_engine 256M
control="unix:$work/engine.control"
attach
step "mkfs.ext4, mount, fio writing files"
mkfs.ext4 -q /dev/nbd0
mkdir -p /mnt/vol
mount /dev/nbd0 /mnt/vol
fio --name=files --directory=/mnt/vol --size=24M --nrfiles=4 --rw=randwrite --bs=4k --ioengine=psync \
    --fsync=16 --numjobs=2 --time_based --runtime=30 --output="$work/fio.out" &
fio=$!
sleep 4
step "snapshot as it is, under fio"
timeout 120 "$KEEL" snapshot create vol as-is --engine "$control"
sleep 2
step "snapshot with --freeze, under fio"
if ! timeout 120 "$KEEL" snapshot create vol frozen --freeze /mnt/vol --engine "$control"; then
    fsfreeze --unfreeze /mnt/vol || true
    echo "snapshot --freeze did not finish"; ps -eo pid,stat,wchan:30,cmd | grep -E "keel|fsfreeze|fio" | grep -v grep
    exit 1
fi
kill $fio 2>/dev/null || true
wait $fio || true
umount /mnt/vol
detach
"$KEEL" snapshot ls vol --engine "$control"

step "copy each snapshot through keel snapshot export (as-is: every replica; frozen: r1 alone)"
for name in as-is frozen; do
    if [ "$name" = as-is ]; then from="--engine $control"; else from="--replica unix:$work/r1.sock"; fi
    "$KEEL" snapshot export vol "$name" $from --listen "unix:$work/export.sock" &
    exporter=$!
    for _ in $(seq 200); do [ -S "$work/export.sock" ] && break; sleep 0.1; done
    nbdinfo --map "nbd+unix:///?socket=$work/export.sock" | head -3
    if [ "$name" = frozen ]; then
        nbdinfo --map=keel:changed:as-is "nbd+unix:///?socket=$work/export.sock" | tail -3
    fi
    nbdcopy "nbd+unix:///?socket=$work/export.sock" "$work/data/$name.img"
    kill $exporter
    wait $exporter || true
done
step "as-is: replay its journal, then e2fsck -fn"
e2fsck -E journal_only -y "$work/data/as-is.img" || true
e2fsck -fn "$work/data/as-is.img"
step "frozen: e2fsck -fn with no replay"
e2fsck -fn "$work/data/frozen.img"
echo "snapshots of a mounted ext4: consistent"
