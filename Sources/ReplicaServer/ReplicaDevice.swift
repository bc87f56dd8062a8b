import Dispatch
import FileExport
import Logging
import IOUring
import NBDProtocol
import NBDServer
import ReplicaIdentity
import ReplicaStore
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A replica's chain of layers as a block device (writes to the head),
/// fenced by epoch.
public final class ReplicaDevice: BlockDevice {
    public let store: ReplicaStore
    public let chain: LayerChain
    let fence: EpochFence
    public let sessions = EngineSessions()
    private let edgeLocks = EdgeLocks()
    /// Makes and hands out the spare head (`prepareSpareHead`); `spare` is only touched on it.
    private let spares = DispatchQueue(label: "keel.replica.spare-head")
    private nonisolated(unsafe) var spare: LayerRecord?

    public init(store: ReplicaStore, chain: LayerChain) {
        self.store = store
        self.chain = chain
        fence = EpochFence(epoch: store.epoch)
        prepareSpareHead()
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

    public struct SnapshotError: Error, CustomStringConvertible {
        public let description: String
    }

    /// The head becomes the snapshot `name`, a new empty head starts on it:
    /// the data path is held meanwhile, and the chain on disk and in memory
    /// stay one. If the two could differ (the change was committed, or may
    /// have been, and memory failed to follow), the replica serves nothing
    /// more until it is restarted and reads its chain from disk.
    public func freezeHead(snapshotName name: String, owner: Owner?) throws -> [Snapshot] {
        try store.checkNewSnapshot(name, owner: owner)
        let newHead = try spares.sync { () throws -> LayerRecord in
            defer { spare = nil }
            return try spare ?? store.makeHeadFiles()
        }
        guard fence.hold(seconds: 5) else {
            try? newHead.files.remove()
            throw SnapshotError(description: "requests in flight did not finish within 5 s; the snapshot was not taken")
        }
        var committed = false
        do {
            defer { fence.release() }
            try chain.freezeHead(newHead: newHead.id, files: newHead.files) {
                committed = true
                try store.freezeHead(snapshotName: name, newHead: newHead, owner: owner, at: Int64(time(nil)))
            }
        } catch {
            if committed {
                fence.breakForGood()
            } else {
                try? newHead.files.remove()
            }
            throw error
        }
        prepareSpareHead()
        return try snapshots()
    }

    /// Makes the next snapshot's head files now, off its pause (creating and
    /// syncing two files and their directory takes milliseconds under load).
    /// Files of a spare never used go at the next open, as any unlisted layer file.
    public func prepareSpareHead() {
        spares.async { [self] in
            guard spare == nil else { return }
            spare = try? store.makeHeadFiles()
        }
    }

    /// A snapshot as a replica reports it: its record and the bytes its own layer takes on disk.
    public struct Snapshot: Equatable, Sendable {
        public var record: SnapshotRecord
        public var ownBytes: UInt64
    }

    public func snapshots() throws -> [Snapshot] {
        let files = chain.dataDescriptors()
        return try store.snapshots().map { record in
            Snapshot(record: record, ownBytes: files[record.layer].map(Self.allocatedBytes) ?? 0)
        }
    }

    private static func allocatedBytes(_ file: FileDescriptor) -> UInt64 {
        var st = stat()
        return fstat(file.rawValue, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0
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
