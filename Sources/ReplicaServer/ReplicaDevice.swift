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
    /// Runs the changes of the chain one at a time: spare heads made ahead,
    /// snapshots' two steps and their records; `spare` and `prepared` are only touched on it.
    let chainWork = DispatchQueue(label: "keel.replica.chain")
    /// The next head's files, made ahead so that a snapshot does not wait for them.
    nonisolated(unsafe) var spare: LayerRecord?
    /// The snapshot whose first step is done.
    nonisolated(unsafe) var prepared: String?

    public init(store: ReplicaStore, chain: LayerChain) {
        self.store = store
        self.chain = chain
        fence = EpochFence(epoch: store.epoch)
        chainWork.async { [self] in spare = try? store.makeHeadFiles() }
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

    /// The first of a snapshot's two steps, while the data path goes on:
    /// the new head's files (the spare, made ahead) are recorded durably as
    /// a pending freeze under the snapshot's name, and opened.
    public func prepareFreeze(snapshotName name: String, owner: Owner?) throws {
        try chainWork.sync {
            try store.checkNewSnapshot(name, owner: owner)
            let newHead = try spare ?? store.makeHeadFiles()
            spare = nil
            try store.recordPendingFreeze(.init(name: name, newHead: newHead, time: Int64(time(nil))), owner: owner)
            try chain.prepare(newHead: newHead.id, files: newHead.files)
            prepared = name
        }
    }

    /// The second step, while the engine holds its writes: the head becomes
    /// the snapshot `name` and the prepared head the head on it. The data
    /// path is held for the switch in memory and one synced 16-byte write.
    /// Then, in the background, the snapshot is sealed: its layer synced,
    /// then recorded (`snapshots()` waits for it). After a crash before
    /// that, `settlePendingFreeze` records it unsealed: a power cut may have
    /// taken writes from it, others than from its peers' copies, and the next
    /// engine start removes it. If the switch may have reached the disk without
    /// memory following, the replica serves nothing more until it is
    /// restarted and reads its chain from disk.
    public func switchHead(snapshotName name: String, owner: Owner?) throws {
        try chainWork.sync {
            guard prepared == name else {
                throw SnapshotError(description: "snapshot \(name) was not prepared on this replica; prepare it first")
            }
            try store.checkOwner(owner)
            guard fence.hold(seconds: 5) else {
                throw SnapshotError(description: "requests in flight did not finish within 5 s; the snapshot was not taken")
            }
            defer { fence.release() }
            let frozen: [FileDescriptor]
            do { frozen = try chain.switchToPrepared() } catch {
                fence.breakForGood()
                throw error
            }
            prepared = nil
            chainWork.async { [self] in
                // A failure here is mended at the next open, from the switch marker.
                try? store.commitPendingFreeze(sealed: faults.skipDataSync || chain.seal(frozen))
                if spare == nil { spare = try? store.makeHeadFiles() }
            }
        }
    }

    /// A snapshot as a replica reports it: its record and the bytes its own layer takes on disk.
    public struct Snapshot: Equatable, Sendable {
        public var record: SnapshotRecord
        public var ownBytes: UInt64
    }

    /// The snapshots, once the records of any switched to are written.
    public func snapshots() throws -> [Snapshot] {
        chainWork.sync {}
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
