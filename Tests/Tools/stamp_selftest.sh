#!/usr/bin/env bash
# Self-test of Tests/Tools/stamp.py against `keel export` (about 10 s):
# writes with 2 connections and --overlap, checks (must pass, over NBD and in
# the file), then corrupts one block and rewinds another to an older stamp of
# its own by hand: check must report exactly 1 corrupt and 1 lost, and compare
# 2 diverged blocks.
#   Tests/Tools/stamp_selftest.sh [KEEL_BINARY]     (default .build/debug/keel)
set -euo pipefail
cd "$(dirname "$0")/../.."
KEEL=${1:-${KEEL:-.build/debug/keel}}
PY=/usr/bin/python3
export PYTHONDONTWRITEBYTECODE=1
STAMP=Tests/Tools/stamp.py
[ -x "$KEEL" ] || { echo "stamp selftest: no keel binary at $KEEL" >&2; exit 2; }
D=$(mktemp -d /var/tmp/stamp-selftest.XXXXXX)
SOCK=$D/s.sock
URI="nbd+unix:///?socket=$SOCK"
pid=

stop_export() {
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
}
cleanup() { stop_export; rm -rf "$D"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start_export() {
    rm -f "$SOCK"
    "$KEEL" export "$D/img" --listen "unix:$SOCK" 2>>"$D/export.log" &
    pid=$!
    for _ in $(seq 100); do
        if $PY -c 'import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$SOCK" 2>/dev/null; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "stamp selftest: keel export did not start:" >&2; cat "$D/export.log" >&2; exit 1
}

fail() { echo "stamp selftest: FAILED: $*" >&2; exit 1; }

truncate -s 16M "$D/img"
start_export
echo "== write: 2 connections, --overlap, 3 s"
$PY $STAMP write --uri "$URI" --uri "$URI" --blocks 512 --seconds 3 --depth 16 --seed 42 --log "$D/log" --overlap
echo "== check over NBD (must pass)"
$PY $STAMP check --log "$D/log" --uri "$URI" || fail "check over NBD"
stop_export
echo "== check of the file (must pass)"
$PY $STAMP check --log "$D/log" --file "$D/img" || fail "check of the file"
cp "$D/img" "$D/img.orig"

echo "== corrupt one block, rewind another to an older generation of its own"
$PY - "$D/log" "$D/img" <<'EOF'
import os, sys
sys.path.insert(0, "Tests/Tools")
import stamp
log = stamp.Log(sys.argv[1])
with open(sys.argv[2], "r+b") as f:
    def at(b):
        return log.offset + b * log.bs
    blocks = sorted(log.by_block)
    corrupt = blocks[0]
    # a block with a superseded (acknowledged, then overwritten after its ack) generation
    for b in blocks[1:]:
        allowed, _, _, _ = log.expectation(b)
        old = [log.writes[s] for s in log.by_block[b] if log.writes[s][1] not in allowed and log.writes[s][3]]
        if old:
            rewind, (blk, gen, seed, ack) = b, old[0][:4]
            break
    else:
        sys.exit("no superseded generation in the log")
    f.seek(at(corrupt) + 1000)
    f.write(os.urandom(16))          # a torn body: header intact, body does not verify
    f.seek(at(rewind))
    f.write(stamp.block_content(seed, rewind, gen, log.bs))
    print(f"corrupted block {corrupt}; rewound block {rewind} to gen {gen} (acked at {ack}, superseded)")
EOF

echo "== check of the file (must report 1 lost, 1 corrupt)"
set +e
out=$($PY $STAMP check --log "$D/log" --file "$D/img"); rc=$?
set -e
echo "$out"
[ $rc -eq 1 ] || fail "check exited $rc, not 1"
echo "$out" | head -1 | grep -q 'lost 1, corrupt 1$' || fail "expected lost 1, corrupt 1"
echo "== the same over NBD"
start_export
set +e
out=$($PY $STAMP check --log "$D/log" --uri "$URI"); rc=$?
set -e
echo "$out" | head -1
stop_export
[ $rc -eq 1 ] && echo "$out" | head -1 | grep -q 'lost 1, corrupt 1$' || fail "check over NBD after tampering"
echo "== compare with the copy taken before tampering (must find 2)"
set +e
out=$($PY $STAMP compare --log "$D/log" "$D/img" "$D/img.orig"); rc=$?
set -e
echo "$out"
[ $rc -eq 1 ] && echo "$out" | head -1 | grep -q '^diverged: 2 blocks$' || fail "compare"
$PY $STAMP compare "$D/img.orig" "$D/img.orig" >/dev/null || fail "compare of identical files"
echo "stamp selftest: ok"
