# A replicated volume as /dev/nbd0 with 2 connections: mkfs.ext4, mount, write
# files, sync, checksum, unmount, detach; attach again, mount, checksums match.
. "$(dirname "$0")/common.sh"
for i in 0 1 2; do start_replica $i 256M; done
start_engine 256M
step "attach with 2 connections"
attach
cat /sys/block/nbd0/size
step "mkfs.ext4, mount, write files, sync"
mkfs.ext4 -q /dev/nbd0
mkdir -p /mnt/vol
mount /dev/nbd0 /mnt/vol
for i in 1 2 3; do head -c $((i * 5))M /dev/urandom > /mnt/vol/file$i; done
sync
(cd /mnt/vol && sha256sum file1 file2 file3) > "$work/sums"
umount /mnt/vol
detach
step "attach again, mount, verify"
attach
mount /dev/nbd0 /mnt/vol
(cd /mnt/vol && sha256sum -c "$work/sums")
umount /mnt/vol
detach
"$KEEL" status --engine "unix:$work/engine.control"
echo "checksums match"
