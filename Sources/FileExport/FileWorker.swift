import CSyscalls
import IOUring
import NBDProtocol
import NBDServer
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Runs requests against a `FileDevice` on one thread's ring.
///
/// Reads and writes cover the request's aligned span. An unaligned write
/// reads its partial edge blocks first (read-modify-write), holding them in
/// `EdgeLocks` so that concurrent partial writes to one block cannot lose
/// each other's bytes; a held lock is retried after a short ring timeout.
public final class FileWorker: BlockWorker {
    /// Sub-operation numbers carried in the completion token.
    enum Operation: UInt8 {
        case read = 1, write, headRead, tailRead, headWrite, tailWrite, lockRetry, allocate, zeroFill, sync
    }

    /// `IORequest.phase` bits.
    private static let edgesLocked: UInt8 = 1
    private static let syncIssued: UInt8 = 2
    private static let headReadPending: UInt8 = 4
    private static let tailReadPending: UInt8 = 8

    private let device: FileDevice
    private let ring: Ring
    private let arena: BufferArena
    private let fd: FileDescriptor
    private let alignment: Int
    private let lockRetryDelay = TimeoutDuration(nanoseconds: 20_000)
    private lazy var zeroes: BufferArena.Buffer? = {
        guard let buffer = arena.allocate(BufferArena.largestClass) else { return nil }
        buffer.base.initializeMemory(as: UInt8.self, repeating: 0, count: buffer.capacity)
        return buffer
    }()

    init(device: FileDevice, ring: Ring, arena: BufferArena) {
        self.device = device
        self.ring = ring
        self.arena = arena
        fd = device.descriptor
        alignment = device.alignment
    }

    // MARK: - BlockWorker

    public func start(_ r: UnsafeMutablePointer<IORequest>, token: IOToken) -> IOStatus {
        switch r.pointee.command {
        case .read:
            submitRead(r, token)
        case .write:
            if edges(of: r.pointee).exist { return lockAndReadEdges(r, token) }
            submitWrite(r, token)
        case .writeZeroes:
            if edges(of: r.pointee).exist {
                let status = lockAndReadEdges(r, token)
                if status != .inFlight { return status }
            }
            submitZeroInterior(r, token)
            return finishIfIdle(r, token)
        case .trim:
            let (start, end) = interior(of: r.pointee)
            guard start < end else { return finishIfIdle(r, token) }
            submit(r, token, .allocate) {
                ring.fallocate(fd, mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                               offset: start, length: end - start, userData: $0)
            }
        case .flush:
            guard !device.readOnly else { return .done(nil) }
            r.pointee.phase |= Self.syncIssued
            submit(r, token, .sync) { ring.fdatasync(fd, userData: $0) }
        case .cache:
            if !device.isDirect {
                _ = posix_fadvise(fd.rawValue, Int(r.pointee.offset), Int(r.pointee.length), POSIX_FADV_WILLNEED)
            }
            return .done(nil)
        case .blockStatus:
            return .done(describeAllocation(r))
        case .disconnect:
            return .done(nil)
        }
        return .inFlight
    }

    public func complete(_ r: UnsafeMutablePointer<IORequest>, token: IOToken, result: Int32) -> IOStatus {
        r.pointee.pendingOperations -= 1
        let operation = Operation(rawValue: token.sub)!
        switch operation {
        case .read:
            if result < 0 { r.fail(errno: -result) }
            else if result == 0 {
                // Past the end of a file that shrank under us: the rest reads as zeroes.
                let done = r.pointee.progress
                r.pointee.buffer!.base.advanced(by: done)
                    .initializeMemory(as: UInt8.self, repeating: 0, count: r.pointee.alignedLength - done)
            } else {
                r.pointee.progress += Int(result)
                if r.pointee.progress < r.pointee.alignedLength { submitRead(r, token) }
            }
        case .write:
            if result <= 0 { r.fail(errno: result < 0 ? -result : EIO) }
            else {
                r.pointee.progress += Int(result)
                if r.pointee.progress < r.pointee.alignedLength { submitWrite(r, token) }
            }
        case .headRead, .tailRead:
            if result != Int32(alignment) { r.fail(errno: result < 0 ? -result : EIO) }
            r.pointee.phase &= ~(operation == .headRead ? Self.headReadPending : Self.tailReadPending)
            let bothArrived = r.pointee.phase & (Self.headReadPending | Self.tailReadPending) == 0
            if bothArrived && r.pointee.firstError == nil { edgesArrived(r, token) }
        case .headWrite, .tailWrite:
            if result != Int32(alignment) { r.fail(errno: result < 0 ? -result : EIO) }
        case .lockRetry:
            let status = lockAndReadEdges(r, token)
            if status != .inFlight { return status }
        case .allocate:
            if result < 0 { allocationFailed(r, token, errno: -result) }
        case .zeroFill:
            if result <= 0 { r.fail(errno: result < 0 ? -result : EIO) }
            else {
                r.pointee.progress += Int(result)
                submitZeroFill(r, token)
            }
        case .sync:
            if result < 0 { r.fail(errno: -result) }
        }
        return finishIfIdle(r, token)
    }

    // MARK: - Read and write

    private func submitRead(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) {
        let request = r.pointee
        let done = request.progress
        let buffer = request.buffer!
        submit(r, token, .read) {
            ring.read(fd, into: buffer.base + done, count: request.alignedLength - done,
                      at: request.alignedOffset + UInt64(done), fixed: buffer.isFixed, userData: $0)
        }
    }

    private func submitWrite(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) {
        let request = r.pointee
        let done = request.progress
        let buffer = request.buffer!
        submit(r, token, .write) {
            ring.write(fd, from: buffer.base + done, count: request.alignedLength - done,
                       at: request.alignedOffset + UInt64(done), fixed: buffer.isFixed,
                       dataSync: request.flags.contains(.fua), userData: $0)
        }
    }

    // MARK: - Edges (read-modify-write)

    /// The partial blocks at the ends of an unaligned range (direct I/O only).
    struct Edges {
        var head: UInt64?
        var tail: UInt64?
        /// Both ends fall in one block: it is read and written once, as the head.
        var sameBlock: Bool
        var exist: Bool { head != nil || tail != nil }
    }

    private func edges(of request: IORequest) -> Edges {
        guard device.isDirect, request.length > 0 else { return Edges(head: nil, tail: nil, sameBlock: false) }
        let a = UInt64(alignment)
        let start = request.offset, end = request.offset + UInt64(request.length)
        var head: UInt64? = start % a != 0 ? start / a : nil
        var tail: UInt64? = end % a != 0 ? end / a : nil
        let same = head != nil && head == tail
        if same { tail = nil }
        if head == nil && tail != nil && start / a == tail! {
            // Aligned start, partial end in the same block: treat it as the head block.
            head = tail; tail = nil
            return Edges(head: head, tail: nil, sameBlock: true)
        }
        return Edges(head: head, tail: tail, sameBlock: same)
    }

    private func lockAndReadEdges(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) -> IOStatus {
        let e = edges(of: r.pointee)
        if r.pointee.scratch == nil {
            guard let scratch = arena.allocate(2 * alignment) else { return .done(.noMemory) }
            r.pointee.scratch = scratch
        }
        guard device.edgeLocks.tryLock(e.head, e.tail) else {
            submit(r, token, .lockRetry) { ring.timeout(lockRetryDelay, userData: $0) }
            return .inFlight
        }
        r.pointee.phase |= Self.edgesLocked
        let scratch = r.pointee.scratch!
        let a = alignment
        if let head = e.head {
            r.pointee.phase |= Self.headReadPending
            submit(r, token, .headRead) {
                ring.read(fd, into: scratch.base, count: a, at: head * UInt64(a), fixed: scratch.isFixed, userData: $0)
            }
        }
        if let tail = e.tail {
            r.pointee.phase |= Self.tailReadPending
            submit(r, token, .tailRead) {
                ring.read(fd, into: scratch.base + a, count: a, at: tail * UInt64(a), fixed: scratch.isFixed, userData: $0)
            }
        }
        return .inFlight
    }

    /// Edge blocks are in `scratch` (head at 0, tail at `alignment`).
    private func edgesArrived(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) {
        let e = edges(of: r.pointee)
        let a = alignment
        let scratch = r.pointee.scratch!.base
        let startInBlock = Int(r.pointee.offset % UInt64(a))
        let endInBlock = Int((r.pointee.offset + UInt64(r.pointee.length)) % UInt64(a))
        if r.pointee.command == .write {
            let buffer = r.pointee.buffer!.base
            let spanEnd = r.pointee.alignedLength
            if e.head != nil && startInBlock > 0 {
                buffer.copyMemory(from: scratch, byteCount: startInBlock)
            }
            if endInBlock > 0 {
                let tailScratch = e.sameBlock || e.tail == nil ? scratch : scratch + a
                (buffer + spanEnd - a + endInBlock).copyMemory(from: tailScratch + endInBlock, byteCount: a - endInBlock)
            }
            r.pointee.progress = 0
            submitWrite(r, token)
            return
        }
        // WRITE_ZEROES: zero the covered bytes of each edge block and write it back.
        if let head = e.head {
            let zeroEnd = e.sameBlock ? (endInBlock == 0 ? a : endInBlock) : a
            (scratch + startInBlock).initializeMemory(as: UInt8.self, repeating: 0, count: zeroEnd - startInBlock)
            let fua = r.pointee.flags.contains(.fua)
            submit(r, token, .headWrite) {
                ring.write(fd, from: scratch, count: a, at: head * UInt64(a), fixed: r.pointee.scratch!.isFixed,
                           dataSync: fua, userData: $0)
            }
        }
        if let tail = e.tail {
            (scratch + a).initializeMemory(as: UInt8.self, repeating: 0, count: endInBlock)
            let fua = r.pointee.flags.contains(.fua)
            submit(r, token, .tailWrite) {
                ring.write(fd, from: scratch + a, count: a, at: tail * UInt64(a), fixed: r.pointee.scratch!.isFixed,
                           dataSync: fua, userData: $0)
            }
        }
    }

    // MARK: - Zeroes and trim

    /// The whole blocks inside the request (the whole request for buffered I/O).
    private func interior(of request: IORequest) -> (UInt64, UInt64) {
        let a = UInt64(alignment)
        let start = (request.offset + a - 1) / a * a
        let end = (request.offset + UInt64(request.length)) / a * a
        return (start, max(start, end))
    }

    private func submitZeroInterior(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) {
        let (start, end) = interior(of: r.pointee)
        guard start < end else { return }
        // Without NO_HOLE the range may be deallocated, as long as it reads back as zeroes.
        let mode = r.pointee.flags.contains(.noHole)
            ? FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            : FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        submit(r, token, .allocate) {
            ring.fallocate(fd, mode: mode, offset: start, length: end - start, userData: $0)
        }
    }

    private func allocationFailed(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken, errno: Int32) {
        let unsupported = errno == EOPNOTSUPP || errno == ENOTSUP || errno == EINVAL
        switch r.pointee.command {
        case .trim where unsupported:
            break  // TRIM is advisory.
        case .writeZeroes where unsupported:
            if r.pointee.flags.contains(.fastZero) {
                r.pointee.firstError = r.pointee.firstError ?? .notSupported
            } else {
                r.pointee.progress = 0
                submitZeroFill(r, token)
            }
        default:
            r.fail(errno: errno)
        }
    }

    /// Writes zeroes over the interior, one chunk at a time, where fallocate cannot.
    private func submitZeroFill(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) {
        let (start, end) = interior(of: r.pointee)
        let done = UInt64(r.pointee.progress)
        guard start + done < end else { return }
        guard let zeroes else { r.fail(errno: ENOMEM); return }
        let count = Int(min(UInt64(zeroes.capacity), end - start - done))
        let fua = r.pointee.flags.contains(.fua)
        submit(r, token, .zeroFill) {
            ring.write(fd, from: zeroes.base, count: count, at: start + done, fixed: zeroes.isFixed,
                       dataSync: fua, userData: $0)
        }
    }

    // MARK: - Block status

    /// `base:allocation` from SEEK_DATA / SEEK_HOLE.
    private func describeAllocation(_ r: UnsafeMutablePointer<IORequest>) -> NBDError? {
        let buffer = r.pointee.buffer!
        let capacity = r.pointee.allocationCapacity
        let end = r.pointee.offset + UInt64(r.pointee.length)
        var position = r.pointee.offset
        var count = 0
        while position < end && count < capacity {
            let (extentEnd, isData) = FileAllocation.run(of: fd, at: position, before: end)
            let state: AllocationState = isData ? [] : [.hole, .zero]
            let descriptor = buffer.base + count * 8
            descriptor.storeBigEndian(UInt32(extentEnd - position), at: 0)
            descriptor.storeBigEndian(state.rawValue, at: 4)
            count += 1
            position = extentEnd
        }
        r.pointee.descriptorCount = count
        return nil
    }

    // MARK: - Helpers

    private func submit(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken, _ operation: Operation,
                        _ prepare: (UInt64) -> Void) {
        r.submitting(token, sub: operation.rawValue, prepare)
    }

    /// When nothing is in flight: release edge locks, sync for FUA if needed, report.
    private func finishIfIdle(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) -> IOStatus {
        guard r.pointee.pendingOperations == 0 else { return .inFlight }
        if r.pointee.phase & Self.edgesLocked != 0 {
            let e = edges(of: r.pointee)
            device.edgeLocks.unlock(e.head, e.tail)
            r.pointee.phase &= ~Self.edgesLocked
        }
        let command = r.pointee.command
        if r.pointee.firstError == nil, r.pointee.flags.contains(.fua),
           command == .trim || command == .writeZeroes, r.pointee.phase & Self.syncIssued == 0 {
            r.pointee.phase |= Self.syncIssued
            submit(r, token, .sync) { ring.fdatasync(fd, userData: $0) }
            return .inFlight
        }
        return .done(r.pointee.firstError)
    }
}
