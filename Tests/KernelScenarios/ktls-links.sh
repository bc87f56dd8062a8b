# fio with crc32c verification on the volume's kernel device while every
# link runs over TLS on loopback TCP: the engine's links to its three
# replicas, whose ends are kTLS (once a session is established the replica
# hands its records to the kernel, tls.ko, and io_uring's sends and receives
# carry plaintext as before), and the device's own links to the engine: the
# frontend starts TLS, negotiates the export inside it and hands the session
# to the kernel before the NBD driver gets the socket. Functional, not a speed figure.
. "$(dirname "$0")/common.sh"
ip link set lo up
"$KEEL" ca init --state-dir "$work/state" >/dev/null
"$KEEL" cert issue node --ip 127.0.0.1 --state-dir "$work/state" >/dev/null
credentials="$work/state/tls/node"
REPLICAS=""
for i in 0 1 2; do
    port=$((7100 + 2 * i))
    "$KEEL" replica serve --dir "$work/data/r$i" --listen "127.0.0.1:$port" --size 128M --log-level info \
        --tls require --tls-certificates "$credentials" 2>>"$work/r$i.log" &
    for _ in $(seq 300); do grep -q "serving replica" "$work/r$i.log" && break; sleep 0.1; done
    grep -q "serving replica" "$work/r$i.log" || { echo "replica $i did not start"; exit 1; }
    REPLICAS="$REPLICAS --replica 127.0.0.1:$port"
done
ENGINE_LISTEN=127.0.0.1:10809
ENGINE_EXTRA="--replica-tls require --tls require --tls-certificates $credentials"
start_plain_engine 128M
FRONTEND_EXTRA="--tls-certificates $credentials --link-tls require"
start_frontend 127.0.0.1:10809
step "fio randwrite + verify on $device over TLS links"
start_fio_verify 8
check_fio
# The kernel's own count of sockets whose records it holds (software kTLS), while the links are up.
grep -E "TlsCurr(Tx|Rx)Sw" /proc/net/tls_stat
# Three replica links (their replicas' ends) and the device's two links at both ends.
[ "$(awk '/TlsCurrRxSw/ {print $2}' /proc/net/tls_stat)" -ge 7 ] || { echo "fewer than 7 kTLS sockets"; exit 1; }
grep -q "connection(s), TLS held by the kernel (kTLS)" "$work/frontend.log" || { echo "the device's links are not kTLS"; cat "$work/frontend.log"; exit 1; }
stop_kernel_engine
for i in 0 1 2; do
    count=$(grep -c "TLS records in the kernel (kTLS)" "$work/r$i.log" || true)
    echo "replica $i: $count link(s) handed to kTLS, $(grep -c 'TLS1.3' "$work/r$i.log") TLS session(s)"
    [ "$count" -ge 1 ] || { echo "replica $i kept every link in user space"; exit 1; }
done
echo "kTLS links: fio verified"
