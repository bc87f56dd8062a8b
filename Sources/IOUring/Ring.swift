import CLiburing
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// One io_uring, owned by exactly one thread for its whole life.
///
/// Setup asks for SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN (completion
/// work runs only when this thread asks for events, in batches) and falls back
/// to a plain ring on kernels that refuse them.
public final class Ring {
    @usableFromInline var ring = io_uring()
    public let entries: UInt32
    /// The setup flags the kernel accepted.
    public let setupFlags: UInt32
    private var cqeBatch: UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>
    private static let cqeBatchSize = 256
    /// Entries prepared while the submission queue was full and the kernel
    /// would take none (-EBUSY: completions must be reaped first). They go to
    /// the ring, in order, at the next submit, once the caller has reaped:
    /// waiting for room inside `nextSubmission` would spin for ever.
    @usableFromInline var backlog: UnsafeMutablePointer<io_uring_sqe>
    @usableFromInline var backlogCapacity = 64
    @usableFromInline var backlogCount = 0
    /// Test seam: behave as kernels before 5.19 do while completions wait to
    /// be reaped, when a submit made to find room in a full queue takes
    /// nothing (-EBUSY). Today's kernels never do it, so a test must ask.
    public var refusesSubmitsForRoom = false

    public init(entries: UInt32 = 512) throws {
        self.entries = entries
        let preferred = UInt32(IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN)
        var accepted: UInt32 = 0
        var rc: Int32 = -EINVAL
        for flags in [preferred, UInt32(IORING_SETUP_COOP_TASKRUN), 0] {
            var params = io_uring_params()
            params.flags = flags
            // The completion queue is sized for many connections' multishot traffic.
            params.flags |= UInt32(IORING_SETUP_CQSIZE)
            params.cq_entries = entries * 4
            rc = io_uring_queue_init_params(entries, &ring, &params)
            if rc == 0 { accepted = flags; break }
        }
        guard rc == 0 else { throw SystemError(errno: -rc, "io_uring_queue_init") }
        setupFlags = accepted
        cqeBatch = .allocate(capacity: Self.cqeBatchSize)
        backlog = .allocate(capacity: backlogCapacity)
    }

    deinit {
        io_uring_queue_exit(&ring)
        cqeBatch.deallocate()
        backlog.deallocate()
    }

    public var acceptedPreferredFlags: Bool {
        setupFlags & UInt32(IORING_SETUP_DEFER_TASKRUN) != 0
    }

    /// A free submission entry; submits what is queued when the queue is full,
    /// and keeps the entry in the backlog when the kernel takes nothing now.
    @inlinable
    public func nextSubmission() -> UnsafeMutablePointer<io_uring_sqe> {
        if backlogCount == 0 {
            if let sqe = io_uring_get_sqe(&ring) { return sqe }
            if submitForRoom() > 0, let sqe = io_uring_get_sqe(&ring) { return sqe }
        }
        return backlogEntry()
    }

    @usableFromInline
    func submitForRoom() -> Int32 {
        refusesSubmitsForRoom ? -EBUSY : io_uring_submit(&ring)
    }

    @usableFromInline
    func backlogEntry() -> UnsafeMutablePointer<io_uring_sqe> {
        if backlogCount == backlogCapacity {
            let larger = UnsafeMutablePointer<io_uring_sqe>.allocate(capacity: backlogCapacity * 2)
            larger.moveInitialize(from: backlog, count: backlogCount)
            backlog.deallocate()
            backlog = larger
            backlogCapacity *= 2
        }
        let entry = backlog + backlogCount
        entry.initialize(to: io_uring_sqe())
        backlogCount += 1
        return entry
    }

    /// Entries kept in the backlog, waiting for room in the submission queue.
    public var backloggedSubmissions: Int { backlogCount }

    /// Moves backlogged entries into the submission queue, as many as fit, in order.
    private func drainBacklog() {
        var moved = 0
        while moved < backlogCount {
            var sqe = io_uring_get_sqe(&ring)
            if sqe == nil, submitForRoom() > 0 { sqe = io_uring_get_sqe(&ring) }
            guard let sqe else { break }
            sqe.pointee = backlog[moved]
            moved += 1
        }
        guard moved > 0 else { return }
        for i in moved..<backlogCount { backlog[i - moved] = backlog[i] }
        backlogCount -= moved
    }

    /// Submits queued entries and waits until at least `minimum` completions are ready.
    public func submitAndWait(_ minimum: UInt32 = 1) throws {
        drainBacklog()
        // With entries still backlogged, completions must be reaped before any wait.
        let minimum = backlogCount > 0 ? 0 : minimum
        while true {
            let rc = io_uring_submit_and_wait(&ring, minimum)
            if rc >= 0 || rc == -EINTR || rc == -ETIME { return }
            if rc == -EBUSY || rc == -EAGAIN { return }  // completions must be reaped first
            throw SystemError(errno: -rc, "io_uring_submit_and_wait")
        }
    }

    public func submit() throws {
        drainBacklog()
        let rc = io_uring_submit(&ring)
        if rc < 0 && rc != -EINTR && rc != -EBUSY && rc != -EAGAIN {
            throw SystemError(errno: -rc, "io_uring_submit")
        }
    }

    /// Hands every ready completion to `body`, then marks them all seen.
    /// Returns how many there were.
    @discardableResult
    @inline(__always)
    public func drainCompletions(_ body: (Completion) -> Void) -> Int {
        var total = 0
        while true {
            let n = Int(io_uring_peek_batch_cqe(&ring, cqeBatch, UInt32(Self.cqeBatchSize)))
            if n == 0 { return total }
            for i in 0..<n {
                let cqe = cqeBatch[i]!.pointee
                body(Completion(userData: cqe.user_data, result: cqe.res, flags: cqe.flags))
            }
            io_uring_cq_advance(&ring, UInt32(n))
            total += n
            if n < Self.cqeBatchSize { return total }
        }
    }

    /// Registers `memory` as fixed buffer 0 (for READ_FIXED / WRITE_FIXED).
    public func registerBuffer(_ memory: UnsafeMutableRawBufferPointer) throws {
        var iov = iovec(iov_base: memory.baseAddress, iov_len: memory.count)
        let rc = io_uring_register_buffers(&ring, &iov, 1)
        guard rc == 0 else { throw SystemError(errno: -rc, "io_uring_register_buffers") }
    }

    func registerBufferRing(_ reg: inout io_uring_buf_reg) throws {
        let rc = io_uring_register_buf_ring(&ring, &reg, 0)
        guard rc == 0 else { throw SystemError(errno: -rc, "io_uring_register_buf_ring") }
    }
}

/// One completion queue entry, copied out of the ring.
public struct Completion {
    public var userData: UInt64
    public var result: Int32
    public var flags: UInt32

    /// A multishot request stays armed after this completion.
    @inlinable public var hasMore: Bool { flags & UInt32(IORING_CQE_F_MORE) != 0 }

    /// The provided buffer this completion filled, if any.
    @inlinable public var bufferID: UInt16? {
        flags & UInt32(IORING_CQE_F_BUFFER) != 0 ? UInt16(truncatingIfNeeded: flags >> UInt32(IORING_CQE_BUFFER_SHIFT)) : nil
    }
}
