import CSyscalls
import FileExport
import IOUring
import LayerStack
import NBDProtocol
import NBDServer
import ReplicaIdentity
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Runs requests against a `LayerChain` on one thread's ring, in 4 KiB blocks.
///
/// - A read is split by the index into runs, each read from the layer that
///   holds it, zeroed where one records zeroes, and read from the bottom
///   layer's file where no layer records anything.
/// - A write goes to the head's file. When the head has a parent, a record
///   in the head's map log then says the head holds those blocks, and only
///   once that record is written is the write answered (and the index
///   updated); an overwrite of blocks the head holds needs none. The bottom
///   layer's map records only zeroes: its file is the truth elsewhere, so a
///   volume without snapshots writes no records but after a trim.
/// - A partial block at either end is read through the chain first
///   (read-modify-write), held in `EdgeLocks` meanwhile.
/// - TRIM and WRITE_ZEROES record zeroes: a trim in the head never brings an
///   older layer's data back. The head's file gets a hole there (space given
///   back; a failure there loses nothing). WRITE_ZEROES' partial blocks are
///   read-modify-written as data.
/// - FLUSH syncs the head's data and its map log.
public final class ChainWorker: BlockWorker {
    enum Operation: UInt8 {
        case read = 1, write, record, headRead, tailRead, edgeWrite, punch, sync, lockRetry
    }

    /// `IORequest.phase` bits.
    private static let edgesLocked: UInt8 = 1
    private static let recordIssued: UInt8 = 2
    private static let headReadPending: UInt8 = 4
    private static let tailReadPending: UInt8 = 8
    private static let needsRecord: UInt8 = 16
    private static let syncIssued: UInt8 = 32

    static let block = Int(LayerFiles.blockSize)
    /// Scratch: two edge blocks, then the request's map records.
    private static let recordsOffset = 2 * block
    private static let maxRecords = 3

    private let chain: LayerChain
    private let ring: Ring
    private let arena: BufferArena
    private let edgeLocks: EdgeLocks
    private let lockRetryDelay = TimeoutDuration(nanoseconds: 20_000)

    init(chain: LayerChain, ring: Ring, arena: BufferArena, edgeLocks: EdgeLocks) {
        self.chain = chain
        self.ring = ring
        self.arena = arena
        self.edgeLocks = edgeLocks
    }

    // MARK: - BlockWorker

    public func start(_ r: UnsafeMutablePointer<IORequest>, token: IOToken) -> IOStatus {
        switch r.pointee.command {
        case .read:
            submitReads(r, token)
        case .write:
            if edges(of: r.pointee).exist { return lockAndReadEdges(r, token) }
            if needsRecord(r.pointee.alignedOffset, UInt64(r.pointee.alignedLength)) { r.pointee.phase |= Self.needsRecord }
            submitWrite(r, token)
        case .writeZeroes:
            if edges(of: r.pointee).exist { return lockAndReadEdges(r, token) }
            submitZeroes(r, token)
        case .trim:
            submitZeroes(r, token)
        case .flush:
            r.pointee.phase |= Self.syncIssued
            submit(r, token, .sync) { ring.fdatasync(chain.head.data.descriptor, userData: $0) }
            submit(r, token, .sync) { ring.fdatasync(chain.headLog, userData: $0) }
            for file in chain.filesToSyncBesidesTheHead {
                submit(r, token, .sync) { ring.fdatasync(file, userData: $0) }
            }
        case .cache, .disconnect:
            return .done(nil)
        case .blockStatus:
            if r.pointee.wantsAllocation { describeAllocation(r) }
            if r.pointee.extraContext != 0 { describeChanges(r) }
            return .done(nil)
        }
        return finishIfIdle(r, token)
    }

    public func complete(_ r: UnsafeMutablePointer<IORequest>, token: IOToken, result: Int32) -> IOStatus {
        r.pointee.pendingOperations -= 1
        let operation = Operation(rawValue: token.sub)!
        switch operation {
        case .read, .sync, .record:
            if result < 0 { r.fail(errno: -result) }
        case .write:
            if result <= 0 { r.fail(errno: result < 0 ? -result : EIO) } else {
                r.pointee.progress += Int(result)
                if r.pointee.progress < r.pointee.alignedLength { submitWrite(r, token) }
            }
        case .headRead, .tailRead:
            if result < 0 { r.fail(errno: -result) }
            r.pointee.phase &= ~(operation == .headRead ? Self.headReadPending : Self.tailReadPending)
            if r.pointee.phase & (Self.headReadPending | Self.tailReadPending) == 0 && r.pointee.firstError == nil {
                edgesArrived(r, token)
            }
        case .edgeWrite:
            if result != Int32(Self.block) { r.fail(errno: result < 0 ? -result : EIO) }
        case .punch:
            break  // Space only: the map says what the blocks hold.
        case .lockRetry:
            return lockAndReadEdges(r, token)
        }
        return finishIfIdle(r, token)
    }

    // MARK: - Reads

    private func submitReads(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) {
        let request = r.pointee
        let buffer = request.buffer!
        let first = request.alignedOffset / UInt64(Self.block)
        let blocks = first..<first + UInt64(request.alignedLength / Self.block)
        chain.index.withLock { index in
            forEachPlacement(index, session: request.session, in: blocks) { run, placement in
                let at = buffer.base + Int(run.lowerBound - first) * Self.block
                let count = run.count * Self.block
                if placement?.content == .zero {
                    at.initializeMemory(as: UInt8.self, repeating: 0, count: count)
                    return
                }
                let fd = placement.map { chain.layer($0.layer) }?.data.descriptor ?? chain.bottom.data.descriptor
                submit(r, token, .read) {
                    ring.read(fd, into: at, count: count, at: run.lowerBound * UInt64(Self.block),
                              fixed: buffer.isFixed, userData: $0)
                }
            }
        }
    }

    // MARK: - Writes

    /// A write there must record that the head holds the blocks: a head with
    /// a parent records data, the bottom layer forgets zero records.
    private func needsRecord(_ offset: UInt64, _ length: UInt64) -> Bool {
        let blocks = offset / UInt64(Self.block)..<(offset + length) / UInt64(Self.block)
        return chain.index.withLock { index in
            var needed = false
            let onBottom = index.layers.count == 1
            index.head.map.forEach(in: blocks) { _, content in
                if onBottom ? content != nil : content != .data { needed = true }
            }
            return needed
        }
    }

    /// What the head records for blocks written with data.
    private var written: BlockContent? { chain.layers.count == 1 ? nil : .data }

    private func submitWrite(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) {
        let request = r.pointee
        let done = request.progress
        let buffer = request.buffer!
        submit(r, token, .write) {
            ring.write(chain.head.data.descriptor, from: buffer.base + done, count: request.alignedLength - done,
                       at: request.alignedOffset + UInt64(done), fixed: buffer.isFixed,
                       dataSync: request.flags.contains(.fua), userData: $0)
        }
    }

    /// The whole blocks a TRIM or WRITE_ZEROES covers.
    private func interior(of request: IORequest) -> Range<UInt64> {
        let b = UInt64(Self.block)
        let start = (request.offset + b - 1) / b
        let end = (request.offset + UInt64(request.length)) / b
        return start..<max(start, end)
    }

    /// The records a request leaves in the head's map log, once its data is there.
    private func records(of request: IORequest) -> [MapRecord] {
        let b = UInt64(Self.block)
        switch request.command {
        case .write:
            return MapRecord.records(request.alignedOffset / b..<(request.alignedOffset + UInt64(request.alignedLength)) / b, written)
        case .trim, .writeZeroes:
            var records = MapRecord.records(interior(of: request), .zero)
            let e = edges(of: request)
            if request.command == .writeZeroes {
                for edge in [e.head, e.tail].compactMap({ $0 }) { records += MapRecord.records(edge..<edge + 1, written) }
            }
            return records
        default:
            return []
        }
    }

    private func submitZeroes(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) {
        let blocks = interior(of: r.pointee)
        r.pointee.phase |= Self.needsRecord
        guard !blocks.isEmpty else { return }
        let b = UInt64(Self.block)
        submit(r, token, .punch) {
            ring.fallocate(chain.head.data.descriptor, mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           offset: blocks.lowerBound * b, length: UInt64(blocks.count) * b, userData: $0)
        }
    }

    /// Once the data is in the head's file: the records, in one append.
    private func submitRecords(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) -> Bool {
        let records = records(of: r.pointee)
        guard !records.isEmpty else { return false }
        precondition(records.count <= Self.maxRecords, "a request takes at most \(Self.maxRecords) map records")
        if r.pointee.scratch == nil {
            guard let scratch = arena.allocate(Self.recordsOffset + Self.maxRecords * MapRecord.size) else {
                r.fail(errno: ENOMEM)
                return false
            }
            r.pointee.scratch = scratch
        }
        let scratch = r.pointee.scratch!
        let bytes = UnsafeMutableRawBufferPointer(start: scratch.base + Self.recordsOffset, count: records.count * MapRecord.size)
        for (i, record) in records.enumerated() {
            record.encode(into: UnsafeMutableRawBufferPointer(rebasing: bytes[i * MapRecord.size..<(i + 1) * MapRecord.size]))
        }
        let offset = chain.nextLogOffset(records: records.count)
        let fua = r.pointee.flags.contains(.fua)
        submit(r, token, .record) {
            ring.write(chain.headLog, from: bytes.baseAddress!, count: bytes.count, at: offset, fixed: scratch.isFixed,
                       dataSync: fua, userData: $0)
        }
        return true
    }

    // MARK: - Edges (read-modify-write through the chain)

    struct Edges {
        var head: UInt64?
        var tail: UInt64?
        var exist: Bool { head != nil || tail != nil }
    }

    /// The partial blocks at the ends of the request (one, when both ends are in the same block).
    private func edges(of request: IORequest) -> Edges {
        guard request.length > 0 else { return Edges() }
        let b = UInt64(Self.block)
        let start = request.offset, end = request.offset + UInt64(request.length)
        var head: UInt64? = start % b != 0 ? start / b : nil
        var tail: UInt64? = end % b != 0 ? end / b : nil
        if head == nil, let t = tail, start / b == t { head = t; tail = nil }
        if head != nil && head == tail { tail = nil }
        return Edges(head: head, tail: tail)
    }

    private func lockAndReadEdges(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) -> IOStatus {
        let e = edges(of: r.pointee)
        if r.pointee.scratch == nil {
            guard let scratch = arena.allocate(Self.recordsOffset + Self.maxRecords * MapRecord.size) else {
                return .done(.noMemory)
            }
            r.pointee.scratch = scratch
        }
        guard edgeLocks.tryLock(e.head, e.tail) else {
            submit(r, token, .lockRetry) { ring.timeout(lockRetryDelay, userData: $0) }
            return .inFlight
        }
        r.pointee.phase |= Self.edgesLocked
        let scratch = r.pointee.scratch!
        if let head = e.head {
            r.pointee.phase |= Self.headReadPending
            readThroughChain(head, into: scratch.base, fixed: scratch.isFixed, r, token, .headRead)
        }
        if let tail = e.tail {
            r.pointee.phase |= Self.tailReadPending
            readThroughChain(tail, into: scratch.base + Self.block, fixed: scratch.isFixed, r, token, .tailRead)
        }
        return .inFlight
    }

    /// One block from the layer that holds it (the bottom one where none
    /// records it); zeroes (and a no-op read, for the completion to arrive)
    /// where one records zeroes.
    private func readThroughChain(_ block: UInt64, into at: UnsafeMutableRawPointer, fixed: Bool,
                                  _ r: UnsafeMutablePointer<IORequest>, _ token: IOToken, _ operation: Operation) {
        let placement = chain.index.withLock { index in
            var found: Placement?
            index.forEachPlacement(in: block..<block + 1) { _, placement in found = placement }
            return found
        }
        let zero = placement?.content == .zero
        let layer = placement.map { chain.layer($0.layer) } ?? chain.bottom
        if zero { at.initializeMemory(as: UInt8.self, repeating: 0, count: Self.block) }
        submit(r, token, operation) {
            ring.read(layer.data.descriptor, into: at, count: zero ? 0 : Self.block,
                      at: block * UInt64(Self.block), fixed: fixed, userData: $0)
        }
    }

    /// Edge blocks are in `scratch` (head at 0, tail at one block).
    private func edgesArrived(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) {
        let e = edges(of: r.pointee)
        let b = Self.block
        let scratch = r.pointee.scratch!
        let startInBlock = Int(r.pointee.offset % UInt64(b))
        let endInBlock = Int((r.pointee.offset + UInt64(r.pointee.length)) % UInt64(b))
        if r.pointee.command == .write {
            let buffer = r.pointee.buffer!.base
            if startInBlock > 0 { buffer.copyMemory(from: scratch.base, byteCount: startInBlock) }
            if endInBlock > 0 {
                let tail = e.tail == nil ? scratch.base : scratch.base + b
                (buffer + r.pointee.alignedLength - b + endInBlock).copyMemory(from: tail + endInBlock, byteCount: b - endInBlock)
            }
            if needsRecord(r.pointee.alignedOffset, UInt64(r.pointee.alignedLength)) { r.pointee.phase |= Self.needsRecord }
            r.pointee.progress = 0
            submitWrite(r, token)
            return
        }
        // WRITE_ZEROES: the covered bytes of each edge block zeroed, the block written to the head.
        let fua = r.pointee.flags.contains(.fua)
        if let head = e.head {
            let zeroEnd = e.tail == nil && endInBlock > 0 && head == (r.pointee.offset + UInt64(r.pointee.length)) / UInt64(b)
                ? endInBlock : b
            (scratch.base + startInBlock).initializeMemory(as: UInt8.self, repeating: 0, count: zeroEnd - startInBlock)
            submit(r, token, .edgeWrite) {
                ring.write(chain.head.data.descriptor, from: scratch.base, count: b, at: head * UInt64(b),
                           fixed: scratch.isFixed, dataSync: fua, userData: $0)
            }
        }
        if let tail = e.tail {
            scratch.base.advanced(by: b).initializeMemory(as: UInt8.self, repeating: 0, count: endInBlock)
            submit(r, token, .edgeWrite) {
                ring.write(chain.head.data.descriptor, from: scratch.base + b, count: b, at: tail * UInt64(b),
                           fixed: scratch.isFixed, dataSync: fua, userData: $0)
            }
        }
        submitZeroes(r, token)
    }

    // MARK: - Block status

    /// `base:allocation` from the index: data where a layer holds data, a
    /// zero hole where one records zeroes, and the bottom layer's file
    /// allocation (SEEK_DATA) where none records anything.
    private func describeAllocation(_ r: UnsafeMutablePointer<IORequest>) {
        let buffer = r.pointee.buffer!
        let capacity = r.pointee.allocationCapacity
        let b = UInt64(Self.block)
        let start = r.pointee.offset, end = r.pointee.offset + UInt64(r.pointee.length)
        var extents: [(end: UInt64, state: AllocationState)] = []
        chain.index.withLock { index in
            forEachPlacement(index, session: r.pointee.session, in: start / b..<(end + b - 1) / b) { run, placement in
                func add(_ runEnd: UInt64, _ state: AllocationState) {
                    if let last = extents.last, last.state == state {
                        extents[extents.count - 1].end = runEnd
                    } else {
                        extents.append((runEnd, state))
                    }
                }
                let runEnd = min(end, run.upperBound * b)
                guard placement == nil else { return add(runEnd, placement!.content == .data ? [] : [.hole, .zero]) }
                var position = max(start, run.lowerBound * b)
                while position < runEnd {
                    let allocation = FileAllocation.run(of: chain.bottom.data.descriptor, at: position, before: runEnd)
                    add(allocation.end, allocation.isData ? [] : [.hole, .zero])
                    position = allocation.end
                }
            }
        }
        var from = start
        for (i, extent) in extents.prefix(capacity).enumerated() {
            let descriptor = buffer.base + i * 8
            descriptor.storeBigEndian(UInt32(extent.end - from), at: 0)
            descriptor.storeBigEndian(extent.state.rawValue, at: 4)
            from = extent.end
        }
        r.pointee.descriptorCount = min(extents.count, capacity)
    }

    /// `keel:changed:<older>`: the blocks the layers after the older
    /// snapshot's record, up to the session's snapshot, or the head.
    private func describeChanges(_ r: UnsafeMutablePointer<IORequest>) {
        let session = ReplicaSession(r.pointee.session)
        let older = ChangedBlocksContext.layer(replicaID: r.pointee.extraContext)
        let b = UInt64(Self.block)
        let start = r.pointee.offset, end = r.pointee.offset + UInt64(r.pointee.length)
        let capacity = r.pointee.extraCapacity
        let descriptors = r.pointee.extraDescriptors
        var count = 0
        var from = start
        var pending: (end: UInt64, changed: Bool)?
        func put(_ extent: (end: UInt64, changed: Bool)) {
            guard count < capacity else { return }
            descriptors.storeBigEndian(UInt32(extent.end - from), at: count * 8)
            descriptors.storeBigEndian(extent.changed ? ChangedBlocksContext.changed : 0, at: count * 8 + 4)
            count += 1
            from = extent.end
        }
        chain.index.withLock { index in
            let through: LayerID
            if case .snapshot(let layer) = session { through = layer } else { through = index.head.id }
            // A snapshot merged away since the handshake: everything may have changed.
            guard index.index(of: older) != nil else {
                pending = (end, true)
                return
            }
            index.forEachChange(after: older, through: through, in: start / b..<(end + b - 1) / b) { run, changed in
                let runEnd = min(end, run.upperBound * b)
                if let open = pending, open.changed != changed { put(open) }
                pending = (runEnd, changed)
            }
        }
        if let last = pending { put(last) }
        r.pointee.extraDescriptorCount = count
    }

    // MARK: - Helpers

    /// Where a session reads each run: the whole chain for the engine, the
    /// chain up to its snapshot for a snapshot reader.
    private func forEachPlacement(_ index: LayerIndex, session: UInt64, in blocks: Range<UInt64>,
                                  _ body: (Range<UInt64>, Placement?) -> Void) {
        if case .snapshot(let layer) = ReplicaSession(session) {
            index.forEachPlacement(asOf: layer, in: blocks, body)
        } else {
            index.forEachPlacement(in: blocks, body)
        }
    }

    private func submit(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken, _ operation: Operation,
                        _ prepare: (UInt64) -> Void) {
        r.submitting(token, sub: operation.rawValue, prepare)
    }

    /// When nothing is in flight: the records once the data is in place, then
    /// the index, the edge locks, the answer.
    private func finishIfIdle(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) -> IOStatus {
        guard r.pointee.pendingOperations == 0 else { return .inFlight }
        if r.pointee.firstError == nil && r.pointee.phase & Self.needsRecord != 0 {
            if r.pointee.phase & Self.recordIssued == 0 {
                r.pointee.phase |= Self.recordIssued
                if submitRecords(r, token) { return .inFlight }
            }
            let records = records(of: r.pointee)
            chain.index.withLock { index in
                for record in records { index.record(record.content, record.blocks) }
            }
        }
        if r.pointee.phase & Self.edgesLocked != 0 {
            let e = edges(of: r.pointee)
            edgeLocks.unlock(e.head, e.tail)
            r.pointee.phase &= ~Self.edgesLocked
        }
        return .done(r.pointee.firstError)
    }
}
