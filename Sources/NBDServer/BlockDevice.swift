import IOUring
import NBDProtocol

/// What the server core needs from a storage backend (nbdkit's "plugin").
/// One device serves every thread; each thread gets its own worker that
/// submits on that thread's ring.
public protocol BlockDevice: AnyObject, Sendable {
    associatedtype Worker: BlockWorker

    var size: UInt64 { get }
    var readOnly: Bool { get }
    /// Offsets, lengths and buffers of the device's I/O must be multiples of
    /// this; the server lays request buffers out on these boundaries.
    var alignment: Int { get }

    func makeWorker(ring: Ring, arena: BufferArena) throws -> Worker
    /// Makes everything written so far durable (at shutdown).
    func flush() throws
}

/// Runs requests on one thread's ring. `start` either finishes at once or
/// queues ring operations whose user data is `token` with a sub-operation
/// number of the worker's choosing (`IOToken.with(sub:)`); the server then
/// hands each of their completions to `complete` until it reports `.done`.
public protocol BlockWorker: AnyObject {
    func start(_ request: UnsafeMutablePointer<IORequest>, token: IOToken) -> IOStatus
    func complete(_ request: UnsafeMutablePointer<IORequest>, token: IOToken, result: Int32) -> IOStatus
    /// A completion of one of the worker's own operations (`IOToken.worker`).
    func workerEvent(token: IOToken, result: Int32, flags: UInt32)
}

extension BlockWorker {
    public func workerEvent(token: IOToken, result: Int32, flags: UInt32) {}
}

public enum IOStatus: Equatable {
    case inFlight
    case done(NBDError?)
}

/// One accepted request as the device sees it. The server owns the memory;
/// the device may use the scratch fields for its own state machine.
public struct IORequest {
    public var command: CommandType
    public var flags: CommandFlags
    public var offset: UInt64
    public var length: UInt32
    /// The session tag of the export the connection negotiated (`ExportDescription.session`).
    public var session: UInt64

    /// For READ and WRITE: covers `alignedOffset ..< alignedOffset + alignedLength`;
    /// the request's bytes start at `dataOffset`. For BLOCK_STATUS: room for descriptors.
    public var buffer: BufferArena.Buffer?
    public var alignedOffset: UInt64
    public var alignedLength: Int
    public var dataOffset: Int

    /// BLOCK_STATUS: `base:allocation` descriptors the device wrote at the
    /// start of `buffer` (8 bytes each, at most `allocationCapacity`).
    public var descriptorCount: Int
    /// BLOCK_STATUS: whether `base:allocation` is asked for (else only `extraContext`).
    public var wantsAllocation: Bool
    /// BLOCK_STATUS: the other context asked for (`MetaContextOffer.id`), 0 for none;
    /// its descriptors go at `BlockStatusLayout.extraOffset` (at most `extraCapacity`).
    public var extraContext: UInt32
    public var extraDescriptorCount: Int

    // Device scratch state.
    public var phase: UInt8
    public var pendingOperations: Int32
    public var progress: Int
    public var firstError: NBDError?
    public var scratch: BufferArena.Buffer?

    public init() {
        command = .read
        flags = []
        offset = 0
        length = 0
        session = 0
        buffer = nil
        alignedOffset = 0
        alignedLength = 0
        dataOffset = 0
        descriptorCount = 0
        wantsAllocation = true
        extraContext = 0
        extraDescriptorCount = 0
        phase = 0
        pendingOperations = 0
        progress = 0
        firstError = nil
        scratch = nil
    }
}

/// Where a BLOCK_STATUS buffer holds each context's descriptors: with a
/// second context, two regions, the second leaving room before it for the
/// chunk header the server writes there when it sends both.
public enum BlockStatusLayout {
    public static let regionBytes = 4096
    public static let extraOffset = regionBytes + Reply.blockStatusHeaderSize
    public static let bufferWithExtra = 2 * regionBytes
}

extension IORequest {
    /// How many `base:allocation` descriptors fit (1 with REQ_ONE).
    public var allocationCapacity: Int {
        if flags.contains(.requestOne) { return 1 }
        return extraContext == 0 ? buffer!.capacity / 8 : BlockStatusLayout.regionBytes / 8
    }

    /// How many descriptors of `extraContext` fit (1 with REQ_ONE).
    public var extraCapacity: Int {
        flags.contains(.requestOne) ? 1 : (BlockStatusLayout.bufferWithExtra - BlockStatusLayout.extraOffset) / 8
    }

    public var extraDescriptors: UnsafeMutableRawPointer { buffer!.base + BlockStatusLayout.extraOffset }
}
