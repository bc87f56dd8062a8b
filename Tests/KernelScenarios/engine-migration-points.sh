# Rows 1-4 of the Longhorn HA migration matrix repeated with the fault at a
# named moment, on a volume of keel volume attached with --mapper, mounted,
# fio randwrite with verify running. Arguments after the keel binary: the
# repetitions, each ROW-ACTION-POINT:
#   ROW     1 engine B crashes, 2 engine B loses every replica link,
#           3 engine A crashes, 4 every replica crashes
#   ACTION  confirm or rollback
#   POINT   before (B stands by, the request not made), spawned (keel migrate
#           start stopped once B is spawned), held, a-stopped, activated,
#           switched (keel migrate confirm stopped there: KEEL_MIGRATION_STOP),
#           begun (keel migrate rollback stopped before it stops B), after (the
#           request answered)
# Bench/migration-matrix lists every repetition; the kernel suite runs a seeded
# subset. After each: no command hung, the migration ended with success or
# error, one engine and no orphan process, fio without I/O errors and verified
# (row 4: the volume faults; it recovers once the replicas are back), the
# files checksummed.
. "$(dirname "$0")/migration-common.sh"
mounted_volume --replicas 3
shift

stopped() { grep -q '^State:.*stopped' "/proc/$1/status" 2>/dev/null; }
binary_of() { tr '\0' '\n' < "/proc/$1/cmdline" | head -1; }

# keel_bounded SECONDS ARGS...: keel ARGS, failing the run if it takes longer; its exit status in $rc.
keel_bounded() {
    limit=$1; shift
    rc=0; timeout -s KILL "$limit" "$KEEL" "$@" >"$work/out" 2>"$work/err" || rc=$?
    answered "$limit" "$*"
}
answered() {
    cat "$work/out" "$work/err"
    if [ "$rc" = 137 ]; then echo "keel $2 did not answer within $1 s"; exit 1; fi
}

# at_stop POINT ARGS...: keel ARGS stopping at POINT; there the fault strikes, then it goes on.
at_stop() {
    point=$1; shift
    timeout -s KILL 300 env KEEL_MIGRATION_STOP="$point" "$KEEL" "$@" >"$work/out" 2>"$work/err" &
    bound=$!
    command=""
    for _ in $(seq 1200); do
        command=$(pgrep -P "$bound" | head -1)
        [ -n "$command" ] && stopped "$command" && break
        kill -0 "$bound" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$command" ] || ! stopped "$command"; then
        rc=0; wait "$bound" || rc=$?
        cat "$work/out" "$work/err"; echo "keel $* did not reach stop point $point"; exit 1
    fi
    fault
    kill -CONT "$command"
    rc=0; wait "$bound" || rc=$?
    answered 300 "$*"
}

# Engine B's log since its start says it cut its links.
b_dropped_links() {
    awk '/^-- keel: started/ { cut = 0 } /fault point drop-standby-links/ { cut = 1 } END { exit !cut }' \
        "$KEEL_STATE_DIR/log/keel-engine@vol.service.next.log"
}

fault() {
    echo "-- fault: row $row at $point"
    case $row in
        1) pkill -9 -f "^$b_bin engine serve --volume vol " ;;
        2) touch "$work/cue"
           for _ in $(seq 300); do b_dropped_links && break; sleep 0.1; done
           b_dropped_links || { echo "engine B did not drop its links"; exit 1; } ;;
        3) pkill -9 -f "^$a_bin engine serve --volume vol " ;;
        4) pkill -9 -f "replica serve --dir $KEEL_STATE_DIR/replicas/vol/" ;;
    esac
}

# Until the migration ended or waits for a request (standing by, or running on B after A was lost).
settle() {
    for _ in $(seq 600); do
        "$KEEL" migrate status vol > "$work/status"
        grep -qE "migration_status (success|error)|phase (standing by|running on engine B)" "$work/status" && return 0
        sleep 0.2
    done
    cat "$work/status"; echo "the migration did not settle within 120 s"; exit 1
}

# After row 4: the replicas come back (keel volume attach starts them; an engine the frontend could not
# start then starts), the filesystem is unmounted, the volume attached afresh, checked and mounted again.
recover() {
    touch "$work/fio.stop"
    pkill -f -- "fio --name=cell " || true
    wait "$fio" || true
    grep -hE "err=" "$work"/fio.round* || true
    keel_bounded 180 volume attach vol --mapper --io-timeout 15
    timeout 150 umount /mnt/vol
    keel_bounded 120 volume detach vol
    keel_bounded 180 volume attach vol --mapper --io-timeout 15
    [ "$rc" = 0 ] || exit 1
    e2fsck -fy /dev/keel/vol >/dev/null || [ $? -le 1 ]
    mount /dev/keel/vol /mnt/vol
    fio_start
}

repetition() {
    row=${1%%-*}; rest=${1#*-}; action=${rest%%-*}; point=${rest#*-}
    step "repetition $1: row $row, $action, fault at $point"
    a_bin=$(binary_of "$(engines)")
    b_bin=$KEEL; [ "$a_bin" = "$KEEL" ] && b_bin="$work/keel-upgraded"
    rm -f "$work/cue"
    export KEEL_FAULTS="drop-standby-links-when=$work/cue"
    fio_start
    if [ "$point" = spawned ]; then at_stop start:spawned migrate start vol --binary "$b_bin"
    else keel_bounded 150 migrate start vol --binary "$b_bin"; fi
    unset KEEL_FAULTS
    if [ "$rc" = 0 ]; then
        [ "$point" = before ] && fault
        case $point in
            held|a-stopped|activated|switched) at_stop "confirm:$point" migrate confirm vol ;;
            begun) at_stop rollback:begun migrate rollback vol ;;
            *) keel_bounded 180 migrate "$action" vol ;;
        esac
        [ "$point" = after ] && fault
    fi
    settle
    if grep -q "migration_status migrating" "$work/status"; then
        # Confirm was refused (B not ready), or A was lost and B took over: the request again ends it.
        cat "$work/status"
        if grep -q "phase standing by" "$work/status"; then keel_bounded 150 migrate rollback vol
        else keel_bounded 180 migrate "$action" vol; fi
        [ "$rc" = 0 ] || exit 1
        settle
    fi
    status_says "migration_status \(success\|error\)"
    if [ "$row" = 4 ]; then recover; fi
    # B serves after a success, unless it crashed (row 1: the frontend started this keel's engine) or
    # the volume was attached afresh (row 4).
    if { [ "$row" = 2 ] || [ "$row" = 3 ]; } && [ "$point" != after ] && grep -q "migration_status success" "$work/status"; then
        [ "$(binary_of "$(engines)")" = "$b_bin" ] || { echo "the migration succeeded but engine B does not serve"; exit 1; }
    fi
    cell_end "$1"
}

for repetition in "$@"; do repetition "$repetition"; done
umount /mnt/vol
"$KEEL" volume detach vol
[ -z "$(engines)" ] || { echo "an engine outlived the detach"; exit 1; }
echo "migration repetitions:$cells passed"
