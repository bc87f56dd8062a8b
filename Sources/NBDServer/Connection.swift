import IOUring
import NBDProtocol
import Syscalls
import TLSSession
#if canImport(Glibc)
import Glibc
#endif

/// One client connection on one thread: its protocol phase, its request
/// slots, unconsumed receive buffers and the reply being sent.
final class Connection {
    enum Phase {
        case handshake(Handshake)
        case transmission(RequestPolicy)
    }

    /// What happens to the bytes of the WRITE payload being received.
    enum PayloadTarget {
        case none
        case slot(Int)
        case discard(Int)
    }

    struct PendingInput {
        var bufferID: UInt16
        var offset: Int
        var length: Int
    }

    static let slotCount = 128
    /// Handshake replies a client may leave unread before it is closed.
    static let unreadHandshakeLimit = 1 << 20
    static let maximumBatch = 64

    let index: Int
    let fd: FileDescriptor
    var phase: Phase
    var parser = RequestParser()
    var payloadTarget = PayloadTarget.none
    var payloadFilled = 0

    let slots: UnsafeMutablePointer<Slot>
    var freeSlots: [Int32]
    var busySlots = 0

    var input: [PendingInput] = []
    var inputHead = 0

    /// After STARTTLS: the session, and the decrypted bytes not yet consumed
    /// (kept while every slot is busy). The receive buffers then only pass
    /// through: their bytes are fed to the session as they arrive.
    var tls: TLSSession?
    var plaintext = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    var plaintextHead = 0
    var plaintextCount = 0
    static let plaintextCapacity = 16 * 1024
    /// The kernel is to take the session's records (kTLS) once nothing is in
    /// flight either way; the receive is stopped meanwhile.
    var kernelTLSWanted = false
    /// The kernel has the records: from here on the socket carries plaintext as seen from here.
    var kernelTLS = false

    /// Handshake replies waiting to be sent; they always go before slot replies.
    var rawOutput: [UInt8] = []
    var rawInFlight: UnsafeMutableRawBufferPointer?
    var replyQueue: [Int32] = []
    var replyQueueHead = 0

    // The message being sent: its iovecs and the slots whose replies it carries.
    let message: UnsafeMutablePointer<msghdr>
    let iovecs: UnsafeMutablePointer<iovec>
    var iovecCount = 0
    var batch: [Int32] = []
    /// For each slot of `batch`: the iovec index just past its reply.
    var batchIovecEnds: [Int] = []
    var sending = false

    var receiving = false
    var receiveCancelled = false
    /// No more requests are read: DISC, end of stream, server shutdown, or an error.
    var closing = false
    /// Queued replies are dropped and the socket is shut down.
    var aborted = false
    /// Queued in the thread's list of connections with replies to send.
    var needsFlush = false

    init(index: Int, fd: FileDescriptor, phase: Phase) {
        self.index = index
        self.fd = fd
        self.phase = phase
        slots = .allocate(capacity: Self.slotCount)
        slots.initialize(repeating: Slot(), count: Self.slotCount)
        freeSlots = (0..<Int32(Self.slotCount)).reversed()
        input.reserveCapacity(64)
        replyQueue.reserveCapacity(Self.slotCount)
        batch.reserveCapacity(Self.maximumBatch)
        batchIovecEnds.reserveCapacity(Self.maximumBatch)
        message = .allocate(capacity: 1)
        message.initialize(to: msghdr())
        iovecs = .allocate(capacity: Self.maximumBatch * 2 + 1)
    }

    deinit {
        slots.deinitialize(count: Self.slotCount)
        slots.deallocate()
        message.deallocate()
        iovecs.deallocate()
        rawInFlight?.deallocate()
        plaintext.deallocate()
    }

    func startTLS(_ session: TLSSession) {
        tls = session
        plaintext = .allocate(byteCount: Self.plaintextCapacity, alignment: 8)
    }

    /// Bytes received and not yet consumed, waiting for a free slot.
    var hasPendingInput: Bool {
        tls == nil ? inputHead < input.count : plaintextHead < plaintextCount
    }

    var hasQueuedOutput: Bool {
        !rawOutput.isEmpty || replyQueueHead < replyQueue.count
    }

    /// Nothing refers to this connection any more: it may be closed and forgotten.
    var isQuiescent: Bool {
        busySlots == 0 && !sending && !receiving
    }

    func allocateSlot() -> Int? {
        guard let slot = freeSlots.popLast() else { return nil }
        busySlots += 1
        return Int(slot)
    }

    func releaseSlot(_ index: Int) {
        slots[index].state = .free
        slots[index].rejection = nil
        slots[index].replyData = nil
        slots[index].replyDataLength = 0
        freeSlots.append(Int32(index))
        busySlots -= 1
    }

    func queueReply(_ slot: Int) {
        slots[slot].state = .replyQueued
        replyQueue.append(Int32(slot))
    }

    func popQueuedReply() -> Int? {
        guard replyQueueHead < replyQueue.count else {
            if replyQueueHead > 0 { replyQueue.removeAll(keepingCapacity: true); replyQueueHead = 0 }
            return nil
        }
        defer { replyQueueHead += 1 }
        return Int(replyQueue[replyQueueHead])
    }
}
