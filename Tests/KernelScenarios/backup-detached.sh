# Backups of a detached volume (the Longhorn enhancement this answers makes
# the workload wait for the backup; Keel does not): a volume written through
# /dev/nbdX and backed up attached, detached, backed up incrementally (its
# engine started for the job with the frontend disabled, and stopped), again
# with nothing written (skipped); then, with new data, a detached backup held
# at a test stop point while `keel volume attach` takes its engine over (the
# same engine process serves the device), the backup goes on and ends with
# the engine left running for the attached device; every backup restores to
# what the device held.
. "$(dirname "$0")/common.sh"
start_udev
export KEEL_STATE_DIR="$work/data/state"
store="file://$work/backups"
mkdir -p "$work/backups"

engine_pid() { pgrep -f "keel engine serve --volume vol " || true; }
# state: the volume's state as keel volume show says it (JSON escapes the slashes).
state() { "$KEEL" volume show vol --json | sed -n 's/^  "state" : "\(.*\)",*$/\1/p' | sed 's|\\/|/|g'; }
# last_backup: the id of the volume's newest backup.
last_backup() { "$KEEL" backup ls --target "$store" vol | awk '/^bk-/ { id = $1 } END { print id }'; }
# restored_matches FILE: the newest backup restored holds FILE's bytes at offset 0.
restored_matches() {
    rm -f "$work/restored.img"
    "$KEEL" backup restore "$(last_backup)" --target "$store" --to "$work/restored.img" >/dev/null
    cmp -n "$(stat -c %s "$1")" "$1" "$work/restored.img" || { echo "the restored backup does not hold $1"; exit 1; }
}

step "create, attach, write, back up while attached"
"$KEEL" volume create vol --size 64M --replicas 2
device=$("$KEEL" volume attach vol | head -1)
head -c 8M /dev/urandom > "$work/first"
dd if="$work/first" of="$device" bs=1M oflag=direct status=none
"$KEEL" backup create vol --target "$store"
restored_matches "$work/first"

step "detach; write nothing; the detached backup is skipped"
"$KEEL" volume detach vol
[ "$(state)" = detached ]
"$KEEL" backup create vol --target "$store" > "$work/skip.out" 2> "$work/skip.err"
cat "$work/skip.out" "$work/skip.err"
grep -q "nothing was written to vol since backup" "$work/skip.out" || { echo "not skipped"; exit 1; }
grep -q "its engine started for the backup, frontend disabled" "$work/skip.err" || { echo "no word of the engine"; exit 1; }
[ "$(state)" = detached ] || { echo "the job left the engine: $(state)"; exit 1; }
[ -z "$(engine_pid)" ] || { echo "an engine still runs"; exit 1; }

step "attach, write, detach; the detached backup is incremental and stops the engine it started"
device=$("$KEEL" volume attach vol | head -1)
head -c 4M /dev/urandom > "$work/second"
cat "$work/first" > "$work/both"
dd if="$work/second" of="$work/both" bs=1M seek=2 conv=notrunc status=none
dd if="$work/second" of="$device" bs=1M seek=2 oflag=direct status=none
"$KEEL" volume detach vol
"$KEEL" backup create vol --target "$store" --json > "$work/incremental.json" 2>&1
grep -q '"incremental" : true' "$work/incremental.json" || { cat "$work/incremental.json"; echo "not incremental"; exit 1; }
grep -q "engine of vol stopped" "$work/incremental.json" || { cat "$work/incremental.json"; exit 1; }
[ "$(state)" = detached ] || { echo "the job left the volume $(state)"; exit 1; }
[ -z "$(engine_pid)" ] || { echo "the job left its engine running"; exit 1; }
restored_matches "$work/both"

step "attach while a detached backup runs: the attach takes its engine over, the backup goes on"
device=$("$KEEL" volume attach vol | head -1)
head -c 2M /dev/urandom > "$work/third"
cat "$work/both" > "$work/all"
dd if="$work/third" of="$work/all" bs=1M seek=6 conv=notrunc status=none
dd if="$work/third" of="$device" bs=1M seek=6 oflag=direct status=none
"$KEEL" volume detach vol
KEEL_TEST_PAUSE_AT=backup-read KEEL_TEST_PAUSE_FILE="$work/pause" \
    "$KEEL" backup create vol --target "$store" > "$work/held.out" 2> "$work/held.err" &
backup=$!
for _ in $(seq 600); do [ -e "$work/pause" ] && break; sleep 0.2; done
[ -e "$work/pause" ] || { cat "$work/held.err"; echo "the backup never reached its stop point"; exit 1; }
job_engine=$(engine_pid)
[ -n "$job_engine" ] || { echo "no engine while the backup is held"; exit 1; }
[ "$(state)" = "engine running, frontend disabled" ] || { echo "state while held: $(state)"; exit 1; }
device=$("$KEEL" volume attach vol | head -1)
[ "$(engine_pid)" = "$job_engine" ] || { echo "the attach started another engine ($(engine_pid), was $job_engine)"; exit 1; }
dd if="$device" of="$work/read-while-held" bs=1M count=8 iflag=direct status=none
cmp "$work/read-while-held" "$work/all" || { echo "the device reads wrong while the backup runs"; exit 1; }
rm "$work/pause"
wait "$backup" || { cat "$work/held.out" "$work/held.err"; echo "the backup failed after the attach"; exit 1; }
cat "$work/held.out" "$work/held.err"
grep -q "was attached meanwhile: its engine stays" "$work/held.err" || { echo "the backup did not leave the engine to the attach"; exit 1; }
[ "$(engine_pid)" = "$job_engine" ] && [ "$(state)" = "attached $device" ] || { echo "after the backup: $(state)"; exit 1; }
head -c 1M /dev/urandom | dd of="$device" bs=1M seek=20 oflag=direct status=none
restored_matches "$work/all"

step "detach, rm"
"$KEEL" volume detach vol
"$KEEL" volume rm vol
[ -z "$(engine_pid)" ]
echo "detached-volume backups: complete"
