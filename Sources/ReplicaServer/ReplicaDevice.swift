import FileExport
import Logging
import IOUring
import NBDProtocol
import NBDServer
import ReplicaStore

/// A replica's chain of layers as a block device (writes to the head),
/// fenced by epoch.
public final class ReplicaDevice: BlockDevice {
    public let store: ReplicaStore
    public let chain: LayerChain
    let fence: EpochFence
    public let sessions = EngineSessions()
    private let edgeLocks = EdgeLocks()

    public init(store: ReplicaStore, chain: LayerChain) {
        self.store = store
        self.chain = chain
        fence = EpochFence(epoch: store.epoch)
    }

    public var size: UInt64 { store.size }
    public var readOnly: Bool { false }
    /// Layers hold whole 4 KiB blocks, whatever their files' I/O mode.
    public var alignment: Int { ChainWorker.block }

    public func makeWorker(ring: Ring, arena: BufferArena) throws -> ReplicaWorker {
        ReplicaWorker(device: self, ring: ring, file: ChainWorker(chain: chain, ring: ring, arena: arena, edgeLocks: edgeLocks))
    }

    let faults = ReplicaFaults.fromEnvironment

    public func flush() throws {
        if faults.skipDataSync { return }
        try chain.flush()
    }

    /// The export catalog that claims this replica for engines.
    public func catalog(logger: Logger) -> any ExportCatalog {
        ReplicaCatalog(store: store, fence: fence, sessions: sessions, logger: logger)
    }
}

/// Admits each request through the epoch fence, then runs it on the head file.
public final class ReplicaWorker: BlockWorker {
    /// The sub-operation number of the fence's retry timer (the file worker's are small).
    static let fenceRetry: UInt8 = 0xF0

    private let device: ReplicaDevice
    private let ring: Ring
    private let file: ChainWorker
    private let retryDelay = TimeoutDuration(nanoseconds: 50_000)

    init(device: ReplicaDevice, ring: Ring, file: ChainWorker) {
        self.device = device
        self.ring = ring
        self.file = file
    }

    public func start(_ r: UnsafeMutablePointer<IORequest>, token: IOToken) -> IOStatus {
        if device.faults.skipDataSync {
            if r.pointee.command == .flush { return .done(nil) }
            r.pointee.flags.remove(.fua)
        }
        switch device.fence.enter(session: r.pointee.session) {
        case .reject:
            return .done(.shutdown)
        case .wait:
            ring.timeout(retryDelay, userData: token.with(sub: Self.fenceRetry).rawValue)
            return .inFlight
        case .admit:
            return leavingWhenDone(r, file.start(r, token: token))
        }
    }

    public func complete(_ r: UnsafeMutablePointer<IORequest>, token: IOToken, result: Int32) -> IOStatus {
        if token.sub == Self.fenceRetry { return start(r, token: token) }
        return leavingWhenDone(r, file.complete(r, token: token, result: result))
    }

    private func leavingWhenDone(_ r: UnsafeMutablePointer<IORequest>, _ status: IOStatus) -> IOStatus {
        if case .done = status { device.fence.leave(session: r.pointee.session) }
        return status
    }
}
