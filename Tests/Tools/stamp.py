#!/usr/bin/python3
"""Generation-stamped block writer and checker: proves freshness (no lost
overwrite), which fio's verify cannot see.

Run with Debian's /usr/bin/python3 (it has the `nbd` module of python3-libnbd).

  stamp.py write --uri URI [--uri URI ...] --blocks N [--block-size 4096] [--offset BYTES]
                 (--seconds S | --writes W) --depth D [--seed SEED] --log LOG [--overlap]
                 [--retry-connect] [--drain SECONDS] [--flush-every N] [--json]
  stamp.py check --log LOG (--uri URI | --file PATH [--file PATH ...]) [--durable] [--json] [--show N]
  stamp.py compare [--log LOG] PATH PATH ... [--json]

Every block written holds a 32-byte header (magic, block index, generation,
seed) and a body of pseudo-random bytes derived from (seed, block,
generation), so a torn, corrupt or misplaced block is recognised. The writer
keeps one global event counter (continued from an existing LOG, so several
runs can append to one log and the expected state carries over) and logs,
before a write is sent, its issue number, and when it is answered, its ack
number. The check rule is that of a linearizable register per block: the
content must be that of a write w that no acknowledged write w' supersedes
(w' issued after w was acknowledged), or zeroes when no write to the block
was acknowledged. A write that was never answered (its connection died) is
never superseded: it may land at any time. A write answered with an error may
or may not have landed, but not after its answer (Keel answers a write only
when every replica has answered it), so it is superseded like an acknowledged
one, from its error reply on. A valid stamp of the block that is superseded is
"lost"; anything else is "corrupt".

`check --durable` checks what survives a power cut: only *durable* writes
supersede, i.e. writes acknowledged before a FLUSH of their session was issued
whose answer was success (a FLUSH covers every write the server answered
before it, on any connection: Keel advertises CAN_MULTI_CONN), and FUA writes
once acknowledged; any other write may or may not have survived. Zeroes are
allowed only where no durable write exists. Each new session (S line) is taken
to start after a power cut and recovery of the whole stack: a write of an
earlier session that was never answered is superseded from the next S on,
like a write answered with an error. `write --flush-every N` issues a FLUSH
after every N writes.

Log lines (text, one event per line, appended, torn last line tolerated):
  KEELSTAMP 1 bs=B offset=O blocks=N      first line
  S seq seed pid conns overlap            a writer session starts
  I seq block gen seed conn fua           a write is issued (logged before it is sent)
  A seq iseq                              write iseq answered with success
  E seq iseq errno                        write iseq answered with an error (may have landed, but before this)
  U seq iseq                              write iseq never answered (connection died / abandoned)
  F seq conn / G seq fseq errno           flush issued / answered (used by check --durable)
  D seq conn reason                       a connection is dead or retired
  X seq issued acked errors unacked       a writer session ends
"""
import argparse, errno as errno_mod, hashlib, json, os, random, select, struct, sys, time

MAGIC = b"KEELSTMP"
HEADER = struct.Struct("<8sQQQ")  # magic, block, generation, seed
LOG_VERSION = 1
CHUNK = 1 << 20  # bytes read at a time by check and compare


def die(msg, code=2):
    print(f"stamp: {msg}", file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------- contents

def block_content(seed, block, gen, bs):
    head = HEADER.pack(MAGIC, block, gen, seed)
    body = hashlib.shake_128(struct.pack("<QQQ", seed, block, gen)).digest(bs - HEADER.size)
    return head + body


def decode(data, block, bs):
    """What a block holds: ('zero',), ('stamp', gen, seed), ('torn', gen, seed),
    ('misplaced', other_block, gen), ('garbage',)."""
    if data.count(0) == len(data):
        return ("zero",)
    magic, blk, gen, seed = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        return ("garbage",)
    if blk != block:
        return ("misplaced", blk, gen)
    if block_content(seed, block, gen, bs) != bytes(data):
        return ("torn", gen, seed)
    return ("stamp", gen, seed)


def describe(found):
    kind = found[0]
    if kind == "zero":
        return "zeroes"
    if kind == "garbage":
        return "no stamp (garbage)"
    if kind == "misplaced":
        return f"a stamp of block {found[1]} gen {found[2]}"
    if kind == "torn":
        return f"a torn/corrupt stamp (header gen {found[1]}, body does not verify)"
    return f"gen {found[1]}"


# ---------------------------------------------------------------- the log

class Log:
    """A parsed log: geometry, every write, the global counter, per-block state."""

    def __init__(self, path, header_only=False):
        self.path = path
        self.header_only = header_only
        self.bs = self.offset = self.blocks = None
        self.writes = {}     # iseq -> [block, gen, seed, ack_seq or None, status]
        self.by_block = {}   # block -> list of iseq
        self.by_gen = {}     # (block, gen) -> iseq
        self.max_seq = 0
        self.sessions = 0
        self.session_starts = []  # seq of every S line
        self.flushes = {}         # F seq -> [session, errno of its answer or None]
        self.durable = False      # set by use_durable()
        self.bad_lines = 0
        self.ends_with_newline = True
        self.exists = os.path.exists(path)
        if self.exists:
            self._parse()

    def _parse(self):
        with open(self.path, "rb") as f:
            raw = f.readline() if self.header_only else f.read()
        self.ends_with_newline = raw.endswith(b"\n") or not raw
        lines = raw.decode("ascii", "replace").split("\n")
        if not self.ends_with_newline and not self.header_only:
            lines.pop()  # torn by a kill mid-write: "A 1234 1" may be what is left of "A 1234 17"
            self.bad_lines += 1
        for line in lines:
            if not line:
                continue
            try:
                self._line(line.split())
            except (ValueError, IndexError, KeyError):
                self.bad_lines += 1  # a torn line (writer killed mid-line)

    def _line(self, f):
        tag = f[0]
        if tag == "KEELSTAMP":
            geometry = dict(kv.split("=") for kv in f[2:])
            geometry = (int(geometry["bs"]), int(geometry["offset"]), int(geometry["blocks"]))
            if self.bs is not None and geometry != (self.bs, self.offset, self.blocks):
                raise SystemExit(f"stamp: {self.path}: two different geometries in one log")
            self.bs, self.offset, self.blocks = geometry
            return
        seq = int(f[1])
        if tag == "I":
            if len(f) != 7:
                raise ValueError
            block, gen, seed = int(f[2]), int(f[3]), int(f[4])
            # block, gen, seed, ack, status, error reply, fua, session
            self.writes[seq] = [block, gen, seed, None, "issued", None, int(f[6]), self.sessions]
            self.by_block.setdefault(block, []).append(seq)
            self.by_gen[(block, gen)] = seq
        elif tag == "A":
            w = self.writes[int(f[2])]
            w[3], w[4] = seq, "acked"
        elif tag == "E":
            w = self.writes[int(f[2])]
            w[4], w[5] = "error", seq
        elif tag == "U":
            w = self.writes[int(f[2])]
            if w[4] == "issued":
                w[4] = "unanswered"
        elif tag == "S":
            self.sessions += 1
            self.session_starts.append(seq)
        elif tag == "F":
            self.flushes[seq] = [self.sessions, None]
        elif tag == "G":
            self.flushes[int(f[2])][1] = int(f[3])
        elif tag not in ("D", "X"):
            raise ValueError
        self.max_seq = max(self.max_seq, seq)

    def need_geometry(self):
        if self.bs is None:
            die(f"{self.path}: no KEELSTAMP header line (not a stamp log?)")

    def acked_count(self):
        return sum(1 for w in self.writes.values() if w[3] is not None)

    def last_gen(self):
        last = {}
        for w in self.writes.values():
            if w[1] > last.get(w[0], 0):
                last[w[0]] = w[1]
        return last

    def use_durable(self):
        """Power-cut rules (check --durable): only durable writes supersede."""
        self.durable = True
        # per session, the issue number of its newest FLUSH answered with success
        self.flushed_before = {}
        for fseq, (session, err) in self.flushes.items():
            if err == 0 and fseq > self.flushed_before.get(session, -1):
                self.flushed_before[session] = fseq

    def is_durable(self, w):
        """Acknowledged, and either FUA or answered before a successful FLUSH of its session was issued."""
        return w[3] is not None and (w[6] == 1 or w[3] < self.flushed_before.get(w[7], -1))

    def durable_count(self, session=None):
        return sum(1 for w in self.writes.values() if self.is_durable(w) and (session is None or w[7] == session))

    def flushes_acked(self, session):
        return sum(1 for s, err in self.flushes.values() if s == session and err == 0)

    def required(self, iseq):
        w = self.writes[iseq]
        return self.is_durable(w) if self.durable else w[3] is not None

    def answered(self, iseq):
        """When write iseq was answered (its ack or error reply); with --durable, a write of an
        earlier session never answered counts as answered when the next session starts.
        None: it may still land."""
        w = self.writes[iseq]
        done = w[3] if w[3] is not None else w[5]
        if done is None and self.durable and w[7] < len(self.session_starts):
            done = self.session_starts[w[7]]  # the S of the next session (sessions count from 1)
        return done

    def expectation(self, block):
        """(allowed: {gen: iseq}, zero_allowed, newest acked gen, acked count) for one block;
        after use_durable(), 'acked' means durable."""
        seqs = self.by_block.get(block, [])
        acked = [s for s in seqs if self.required(s)]
        m = max(acked) if acked else -1  # the newest issue number among acknowledged writes
        allowed = {}
        for s in seqs:
            w = self.writes[s]
            done = self.answered(s)  # its answer: the ack, or an error reply
            if done is None or done > m:  # not superseded: no acked write was issued after its answer
                allowed[w[1]] = s
        newest = self.writes[m][1] if acked else None
        return allowed, not acked, newest, len(acked)


def verdict(log, block, found):
    """None if the content is allowed, else (kind 'lost'|'corrupt', text)."""
    allowed, zero_ok, newest, _ = log.expectation(block)
    kind = found[0]
    if kind == "zero":
        if zero_ok:
            return None
        return ("lost", "found zeroes")
    if kind == "stamp":
        gen, seed = found[1], found[2]
        iseq = log.by_gen.get((block, gen))
        if iseq is None:
            return ("corrupt", f"found gen {gen}, which the log never issued")
        if log.writes[iseq][2] != seed:
            return ("corrupt", f"found gen {gen} with seed {seed}, the log issued it with seed {log.writes[iseq][2]}")
        if gen in allowed:
            return None
        w = log.writes[iseq]
        answer = f"acked at {w[3]}" if w[3] is not None else f"failed at {w[5]}" if w[5] is not None else \
            f"never answered, its session cut before {log.answered(iseq)}"
        return ("lost", f"found gen {gen} (issued at {iseq}, {answer}), superseded")
    return ("corrupt", "found " + describe(found))


def expected_text(log, block):
    allowed, zero_ok, newest, nacked = log.expectation(block)
    gens = sorted(allowed)
    parts = []
    if gens:
        span = f"gen {gens[0]}" if len(gens) == 1 else f"gen {gens[0]}..{gens[-1]} ({len(gens)} candidates)"
        parts.append(span)
    if zero_ok:
        parts.append("zeroes")
    text = " or ".join(parts) or "nothing?"
    if newest is not None:
        word = "durable" if log.durable else "acked"
        text += f", newest {word} gen {newest} of {nacked} {word}"
    return text


# ---------------------------------------------------------------- readers

class FileSource:
    def __init__(self, path):
        try:
            self.f = open(path, "rb")
        except OSError as e:
            die(f"{path}: {e.strerror}")
        self.name = path

    def read(self, offset, length):
        data = os.pread(self.f.fileno(), length, offset)
        return data + bytes(length - len(data))  # a short file reads as zeroes

    def close(self):
        self.f.close()


class NBDSource:
    def __init__(self, uri):
        import nbd
        self.h = nbd.NBD()
        try:
            self.h.connect_uri(uri)
        except nbd.Error as e:
            die(f"{uri}: {e}")
        self.size = self.h.get_size()
        self.name = uri

    def read(self, offset, length):
        n = max(0, min(length, self.size - offset))
        data = self.h.pread(n, offset) if n else b""
        return data + bytes(length - n)

    def close(self):
        try:
            self.h.shutdown()
        except Exception:
            pass


def read_blocks(src, bs, offset, blocks):
    """Yield (block, data) for blocks 0..blocks-1 of the range."""
    per = max(1, CHUNK // bs)
    for first in range(0, blocks, per):
        n = min(per, blocks - first)
        data = src.read(offset + first * bs, n * bs)
        for i in range(n):
            yield first + i, data[i * bs:(i + 1) * bs]


# ---------------------------------------------------------------- check

def check_source(log, src):
    bad = []
    lost = corrupt = 0
    for block, data in read_blocks(src, log.bs, log.offset, log.blocks):
        found = decode(data, block, log.bs)
        v = verdict(log, block, found)
        if v is None:
            continue
        if v[0] == "lost":
            lost += 1
        else:
            corrupt += 1
        if len(bad) < 10000:
            bad.append({"block": block, "offset": log.offset + block * log.bs, "kind": v[0],
                        "found": describe(found), "found_gen": found[1] if found[0] == "stamp" else None,
                        "detail": v[1], "expected": expected_text(log, block)})
    src.close()
    return lost, corrupt, bad


def cmd_check(args):
    log = Log(args.log)
    if not log.exists:
        die(f"{args.log}: no such log")
    log.need_geometry()
    if args.durable:
        log.use_durable()
    written = len(log.by_block)
    acked = log.acked_count()
    sources = [("uri", args.uri)] if args.uri else [("file", f) for f in args.file]
    rc = 0
    for kind, name in sources:
        src = NBDSource(name) if kind == "uri" else FileSource(name)
        lost, corrupt, bad = check_source(log, src)
        line = f"stamp: blocks {written}, acknowledged writes {acked}, lost {lost}, corrupt {corrupt}"
        durable = {}
        if args.durable:
            last = log.sessions
            durable = {"durable": log.durable_count(), "durable_last_session": log.durable_count(last),
                       "acked_last_session": sum(1 for w in log.writes.values() if w[7] == last and w[3] is not None),
                       "flushes_acked_last_session": log.flushes_acked(last), "sessions": last}
            line = (f"stamp: blocks {written}, acknowledged writes {acked}, durable writes {durable['durable']} "
                    f"(last session: {durable['durable_last_session']} of {durable['acked_last_session']} acked, "
                    f"{durable['flushes_acked_last_session']} flushes), lost {lost}, corrupt {corrupt}")
        if len(sources) > 1:
            line += f" ({name})"
        if lost or corrupt:
            rc = 1
        if args.json:  # one JSON object per source, one per line
            print(json.dumps({"source": name, "blocks": written, "range_blocks": log.blocks,
                              "writes": len(log.writes), "acknowledged": acked, "lost": lost,
                              "corrupt": corrupt, "bad": bad, "log_bad_lines": log.bad_lines, "line": line,
                              **durable}))
            continue
        print(line)
        for b in bad[:args.show]:
            print(f"  block {b['block']} (offset {b['offset']}): {b['kind']}: {b['detail']}; expected {b['expected']}")
        if len(bad) > args.show:
            print(f"  ... and {len(bad) - args.show} more")
    return rc


# ---------------------------------------------------------------- compare

def cmd_compare(args):
    if len(args.paths) < 2:
        die("compare needs at least two files")
    if args.log:
        log = Log(args.log, header_only=True)
        log.need_geometry()
        bs, offset, blocks = log.bs, log.offset, log.blocks
    else:
        bs, offset = args.block_size, 0
        blocks = min(os.path.getsize(p) for p in args.paths) // bs
    srcs = [FileSource(p) for p in args.paths]
    readers = [read_blocks(s, bs, offset, blocks) for s in srcs]
    diverged = []
    count = 0
    for rows in zip(*readers):
        datas = [d for _, d in rows]
        if all(d == datas[0] for d in datas[1:]):
            continue
        count += 1
        if len(diverged) < 1000:
            block = rows[0][0]
            diverged.append({"block": block, "offset": offset + block * bs,
                             "found": [describe(decode(d, block, bs)) for d in datas]})
    for s in srcs:
        s.close()
    line = f"diverged: {count} blocks"
    if args.json:
        print(json.dumps({"files": args.paths, "blocks": blocks, "diverged": count,
                          "blocks_diverged": diverged, "line": line}))
    else:
        print(line)
        for d in diverged[:args.show]:
            print(f"  block {d['block']} (offset {d['offset']}): " +
                  ", ".join(f"{p}: {f}" for p, f in zip(args.paths, d["found"])))
        if count > args.show:
            print(f"  ... and {count - args.show} more")
    return 1 if count else 0


# ---------------------------------------------------------------- write

def nbd_errno(e):
    """The errno of an nbd.Error as a number (libnbd's Python binding gives its name)."""
    n = getattr(e, "errno", None)
    if isinstance(n, str):
        n = getattr(errno_mod, n, None)
    return n if isinstance(n, int) and n > 0 else errno_mod.EIO


class Op:
    __slots__ = ("iseq", "block", "gen", "buf", "conn", "done", "flush")

    def __init__(self, iseq, block, gen, buf, conn, flush=False):
        self.iseq, self.block, self.gen, self.buf, self.conn = iseq, block, gen, buf, conn
        self.done = False
        self.flush = flush


class Conn:
    def __init__(self, index, uri):
        self.index, self.uri = index, uri
        self.h = None
        self.state = "idle"      # idle -> connecting -> ready -> (retired) -> dead
        self.inflight = {}       # iseq -> Op
        self.next_try = 0.0
        self.blocks = {}         # block -> writes in flight on this connection


class Writer:
    def __init__(self, args):
        import nbd
        self.nbd = nbd
        self.args = args
        self.bs, self.offset, self.blocks = args.block_size, args.offset, args.blocks
        self.log = Log(args.log)
        if self.log.exists and self.log.bs is not None:
            if (self.log.bs, self.log.offset, self.log.blocks) != (self.bs, self.offset, self.blocks):
                die(f"{args.log}: holds bs={self.log.bs} offset={self.log.offset} blocks={self.log.blocks}, "
                    f"not bs={self.bs} offset={self.offset} blocks={self.blocks}")
        self.seq = self.log.max_seq
        self.gen = self.log.last_gen()
        self.fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pending = []
        if not self.log.ends_with_newline:
            self.pending.append("~torn\n")  # glued to the torn line, so that it never parses
        if self.log.bs is None:
            self.pending.append(f"KEELSTAMP {LOG_VERSION} bs={self.bs} offset={self.offset} blocks={self.blocks}\n")
        self.seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(6), "little")
        self.rng = random.Random(self.seed)
        self.conns = [Conn(i, u) for i, u in enumerate(args.uri)]
        self.inflight_blocks = {}  # block -> count of writes in flight (all connections)
        self.stats = dict(issued=0, acked=0, errors=0, unanswered=0, unsent=0, flushes=0, fua=0, overlapped=0,
                          dead=0, retired=0, connected=0)
        self.first_error = None
        self.since_flush = 0  # writes issued since the last FLUSH (--flush-every)

    # -- log
    def next_seq(self):
        self.seq += 1
        return self.seq

    def emit(self, text):
        self.pending.append(text + "\n")

    def flush_log(self):
        if not self.pending:
            return
        data = "".join(self.pending).encode()
        self.pending = []
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    # -- connections
    def start_connect(self, c, now):
        c.h = self.nbd.NBD()
        c.h.set_handle_name(f"stamp{c.index}")
        try:
            c.h.aio_connect_uri(c.uri)
            c.state = "connecting"
        except self.nbd.Error as e:
            self.connect_failed(c, str(e), now)

    def connect_failed(self, c, reason, now):
        c.h = None
        if self.args.retry_connect:
            c.state, c.next_try = "idle", now + 0.1
        else:
            c.state = "dead"
            self.stats["dead"] += 1
            self.emit(f"D {self.next_seq()} {c.index} connect-failed")
            print(f"stamp write: connection {c.index} ({c.uri}): {reason}", file=sys.stderr)

    def connection_lost(self, c, reason):
        if c.state == "dead":
            return
        was_ready = c.state in ("ready", "retired")
        c.state = "dead"
        self.stats["dead"] += 1
        self.emit(f"D {self.next_seq()} {c.index} {reason.replace(' ', '_')[:60]}")
        for op in list(c.inflight.values()):
            self.finish(op, None)  # never answered: may or may not have landed
        if was_ready:
            print(f"stamp write: connection {c.index} lost: {reason}", file=sys.stderr)
        try:
            c.h.close()
        except Exception:
            pass
        c.h = None

    def retire(self, c, why):
        if c.state == "ready":
            c.state = "retired"  # no new requests; the ones in flight are still collected
            self.stats["retired"] += 1
            self.emit(f"D {self.next_seq()} {c.index} retired-{why}")

    # -- completions
    def completion(self, op, err):
        e = err.value
        if op.done:
            return 1
        if e == 0:
            self.finish(op, 0)
        elif e == errno_mod.ENOTCONN:  # libnbd gave up on it: the connection died before the answer
            self.finish(op, None)
        else:
            self.finish(op, e)
            self.retire(op.conn, f"errno{e}")
        return 1

    def finish(self, op, result, sent=True):
        """result: 0 = acked, errno = error reply (or, not sent, refused by libnbd), None = never answered."""
        if op.done:
            return
        op.done = True
        c = op.conn
        c.inflight.pop(op.iseq, None)
        seq = self.next_seq()
        if op.flush:
            self.emit(f"G {seq} {op.iseq} {result if result is not None else -1}")
            return
        n = c.blocks[op.block] - 1
        if n:
            c.blocks[op.block] = n
        else:
            del c.blocks[op.block]
        n = self.inflight_blocks[op.block] - 1
        if n:
            self.inflight_blocks[op.block] = n
        else:
            del self.inflight_blocks[op.block]
        if result == 0:
            self.stats["acked"] += 1
            self.emit(f"A {seq} {op.iseq}")
        elif result is None:
            self.stats["unanswered"] += 1
            self.emit(f"U {seq} {op.iseq}")
        else:
            self.stats["errors" if sent else "unsent"] += 1
            if sent and self.first_error is None:
                self.first_error = time.monotonic() - self.t0
            self.emit(f"E {seq} {op.iseq} {result}")

    # -- issuing
    def pick_block(self, c):
        rng = self.rng
        if self.args.overlap and self.inflight_blocks and rng.random() < 0.4:
            # a block in flight on another connection, not on this one
            for _ in range(8):
                b = rng.choice(list(self.inflight_blocks)) if len(self.inflight_blocks) < 64 else \
                    next(iter(self.inflight_blocks))
                if b not in c.blocks:
                    self.stats["overlapped"] += 1
                    return b
        for _ in range(32):
            b = rng.randrange(self.blocks)
            if b not in self.inflight_blocks:
                return b
        return None

    def issue(self, now):
        ready = [c for c in self.conns if c.state == "ready"]
        if not ready:
            return
        total = sum(len(c.inflight) for c in self.conns)
        batch = []
        while total + len(batch) < self.args.depth:
            if self.args.writes is not None and self.stats["issued"] + len(batch) >= self.args.writes:
                break
            c = self.rng.choice(ready)
            every = self.args.flush_every
            if (self.since_flush >= every) if every else (self.rng.random() < 1 / 64):
                self.since_flush = 0
                iseq = self.next_seq()
                batch.append(Op(iseq, -1, 0, None, c, flush=True))
                self.emit(f"F {iseq} {c.index}")
                continue
            block = self.pick_block(c)
            if block is None:
                break
            targets = [c]
            if self.args.overlap and len(ready) > 1 and self.rng.random() < 0.3:
                # the same block on several connections at once, sent back to back
                others = [x for x in ready if x is not c]
                self.rng.shuffle(others)
                room = self.args.depth - total - len(batch) - 1
                targets += others[:max(0, min(room, self.rng.randint(1, 3)))]
                self.stats["overlapped"] += len(targets) - 1
            for t in targets:
                gen = self.gen.get(block, 0) + 1
                self.gen[block] = gen
                fua = 1 if self.rng.random() < 1 / 16 else 0
                iseq = self.next_seq()
                self.since_flush += 1
                op = Op(iseq, block, gen, bytearray(block_content(self.seed, block, gen, self.bs)), t)
                batch.append((op, fua))
                t.blocks[block] = t.blocks.get(block, 0) + 1
                self.inflight_blocks[block] = self.inflight_blocks.get(block, 0) + 1
                self.emit(f"I {iseq} {block} {gen} {self.seed} {t.index} {fua}")
        if not batch:
            return
        self.flush_log()  # every issue is in the log before it is sent
        for item in batch:
            if isinstance(item, Op):  # flush
                op, c = item, item.conn
                if c.state != "ready":
                    op.done = True
                    continue
                c.inflight[op.iseq] = op
                self.stats["flushes"] += 1
                try:
                    c.h.aio_flush(completion=lambda err, op=op: self.completion(op, err))
                except self.nbd.Error as e:
                    self.finish(op, nbd_errno(e), sent=False)
                    self.connection_check(c, str(e))
                continue
            op, fua = item
            c = op.conn
            c.inflight[op.iseq] = op
            self.stats["issued"] += 1
            self.stats["fua"] += fua
            if c.state != "ready":
                self.finish(op, errno_mod.ENOTCONN, sent=False)
                continue
            try:
                c.h.aio_pwrite(op.buf, self.offset + op.block * self.bs,
                               completion=lambda err, op=op: self.completion(op, err),
                               flags=self.nbd.CMD_FLAG_FUA if fua else 0)
            except self.nbd.Error as e:
                self.finish(op, nbd_errno(e), sent=False)  # refused before it was sent
                self.connection_check(c, str(e))

    def connection_check(self, c, reason):
        if c.h is not None and (c.h.aio_is_dead() or c.h.aio_is_closed()):
            self.connection_lost(c, reason)

    # -- the loop
    def run(self):
        a = self.args
        print(f"stamp write: seed {self.seed}", file=sys.stderr)
        self.t0 = time.monotonic()
        self.emit(f"S {self.next_seq()} {self.seed} {os.getpid()} {len(self.conns)} {1 if a.overlap else 0}")
        self.flush_log()
        end = self.t0 + a.seconds if a.seconds is not None else None
        drain_end = None
        now = self.t0
        for c in self.conns:
            self.start_connect(c, now)
        while True:
            now = time.monotonic()
            stopping = (end is not None and now >= end) or \
                (a.writes is not None and self.stats["issued"] >= a.writes)
            if stopping and drain_end is None:
                drain_end = now + a.drain
            live = [c for c in self.conns if c.state != "dead"]
            inflight = sum(len(c.inflight) for c in self.conns)
            if stopping and (inflight == 0 or now >= drain_end):
                break
            if not stopping and not live:
                break  # every connection is dead
            if not stopping and not a.retry_connect and \
                    not any(c.state in ("ready", "connecting") for c in self.conns) and inflight == 0:
                break  # nothing left to write through
            for c in self.conns:
                if c.state == "idle" and now >= c.next_try and not stopping:
                    self.start_connect(c, now)
            if not stopping:
                self.issue(now)
            fds = {}
            poller = select.poll()
            for c in self.conns:
                if c.state not in ("connecting", "ready", "retired") or c.h is None:
                    continue
                if c.state != "connecting" and (c.h.aio_is_dead() or c.h.aio_is_closed()):
                    self.connection_lost(c, "connection closed by the server")
                    continue
                try:
                    d = c.h.aio_get_direction()
                    fd = c.h.aio_get_fd()
                except self.nbd.Error as e:
                    self.connection_lost(c, str(e))
                    continue
                mask = (select.POLLIN if d & 1 else 0) | (select.POLLOUT if d & 2 else 0)
                if mask:
                    poller.register(fd, mask)
                    fds[fd] = c
            try:
                events = poller.poll(20)
            except InterruptedError:
                events = []
            for fd, ev in events:
                c = fds[fd]
                if c.h is None:
                    continue
                try:
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        c.h.aio_notify_read()
                    elif ev & select.POLLOUT:
                        c.h.aio_notify_write()
                except self.nbd.Error as e:
                    self.connection_lost(c, str(e))
                    continue
            for c in self.conns:
                if c.h is None:
                    continue
                if c.state == "connecting":
                    if c.h.aio_is_ready():
                        size = c.h.get_size()
                        if size < self.offset + self.blocks * self.bs:
                            die(f"{c.uri}: export of {size} bytes is smaller than the range written")
                        c.state = "ready"
                        self.stats["connected"] += 1
                    elif c.h.aio_is_dead() or c.h.aio_is_closed():
                        h = c.h
                        self.connect_failed(c, "connection closed during the handshake", now)
                        try:
                            h.close()
                        except Exception:
                            pass
                elif c.h.aio_is_dead() or c.h.aio_is_closed():
                    self.connection_lost(c, "connection dead")
            self.flush_log()  # the acknowledgements of this batch
        # whatever is still in flight was never answered
        for c in self.conns:
            for op in list(c.inflight.values()):
                self.finish(op, None)
        s = self.stats
        self.emit(f"X {self.next_seq()} {s['issued']} {s['acked']} {s['errors']} {s['unanswered']}")
        self.flush_log()
        os.close(self.fd)
        for c in self.conns:
            if c.h is not None:
                try:
                    c.h.shutdown(self.nbd.SHUTDOWN_ABANDON_PENDING)
                except Exception:
                    pass
                try:
                    c.h.close()
                except Exception:
                    pass
        elapsed = time.monotonic() - self.t0
        line = (f"stamp write: seed {self.seed}, issued {s['issued']}, acked {s['acked']}, errors {s['errors']}, "
                f"unanswered {s['unanswered']}, unsent {s['unsent']}, flushes {s['flushes']}, fua {s['fua']}, overlapped {s['overlapped']}, "
                f"connections {len(self.conns)} (dead {s['dead']}, retired {s['retired']}), {elapsed:.1f}s")
        if a.json:
            print(json.dumps(dict(s, seed=self.seed, elapsed=round(elapsed, 3), first_error=self.first_error,
                                  line=line)))
        print(line, file=sys.stderr)
        return 0 if s["connected"] else 1


def cmd_write(args):
    if args.seconds is None and args.writes is None:
        die("write needs --seconds or --writes")
    if args.block_size < 64 or args.block_size % 512:
        die("--block-size must be a multiple of 512")
    if args.blocks < 1 or args.depth < 1:
        die("--blocks and --depth must be positive")
    return Writer(args).run()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write stamped blocks, logging every issue and acknowledgement")
    w.add_argument("--uri", action="append", required=True, help="an NBD URI; repeat for more connections")
    w.add_argument("--blocks", type=int, required=True)
    w.add_argument("--block-size", type=int, default=4096)
    w.add_argument("--offset", type=int, default=0)
    w.add_argument("--seconds", type=float)
    w.add_argument("--writes", type=int)
    w.add_argument("--depth", type=int, default=16, help="requests in flight over all connections")
    w.add_argument("--seed", type=int)
    w.add_argument("--log", required=True)
    w.add_argument("--overlap", action="store_true",
                   help="keep several writes to one block in flight at once, on different connections")
    w.add_argument("--retry-connect", action="store_true",
                   help="retry a connection that cannot be made yet (a server still starting) until the end")
    w.add_argument("--drain", type=float, default=10.0, help="seconds to wait for answers at the end")
    w.add_argument("--flush-every", type=int, metavar="N",
                   help="a FLUSH after every N writes issued (default: one write in 64, at random)")
    w.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    c = sub.add_parser("check", help="check a volume or file against the log")
    c.add_argument("--log", required=True)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--uri")
    g.add_argument("--file", action="append", help="a file (e.g. a replica's DIR/layers/head.img); repeat for more")
    c.add_argument("--durable", action="store_true",
                   help="after a power cut: only writes acknowledged before an acknowledged FLUSH, and FUA "
                        "writes, must have survived")
    c.add_argument("--json", action="store_true")
    c.add_argument("--show", type=int, default=5, help="bad blocks listed")
    m = sub.add_parser("compare", help="are these files identical over the written range?")
    m.add_argument("paths", nargs="+")
    m.add_argument("--log", help="compare the log's range (default: the whole files)")
    m.add_argument("--block-size", type=int, default=4096)
    m.add_argument("--json", action="store_true")
    m.add_argument("--show", type=int, default=5)
    args = p.parse_args()
    return {"write": cmd_write, "check": cmd_check, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
