import ControlAPI
import IOUring
import LibNBD
import Logging
import ReplicaIdentity
import NBDProtocol
import NBDServer
import Synchronization
import Syscalls

/// The volume as the engine's frontend sees it: every write goes to every
/// writable replica and is acknowledged when all of them acknowledged it;
/// reads go to one healthy replica at a time.
public final class EngineDevice: BlockDevice, @unchecked Sendable {
    public let volume: String
    public let size: UInt64
    public let epoch: UInt64
    /// This engine process's identity: its claims are `(epoch, engine)`.
    public let engineID: String
    /// The volume's identity (`keel volume create` mints it); replicas of another volume refuse this engine.
    public let volumeID: String
    public let replicas: ReplicaSet
    public let gate: WriteGate
    /// How long a replica may leave a command unanswered before it is failed (ns).
    public let replicaTimeout: UInt64
    public let replicaTimeoutSeconds: Double
    public let counters = IOCounters()
    /// A replica being given the snapshots (`ChainCopy`): the chain must not change meanwhile.
    let copyingChain = Mutex<SocketAddress?>(nil)
    /// NBD clients in transmission (`EngineExports`).
    let clients = Atomic<Int>(0)
    public var clientConnections: Int { clients.load(ordering: .relaxed) }
    /// Test-only fault points (`KEEL_FAULTS`), off in normal use.
    public let faults: FaultPoints
    let logger: Logger
    private(set) var keeper: MetadataKeeper!
    private let wakers = Mutex<[EventFD]>([])
    /// I/O threads connected to each replica: a rebuild starts copying only once all are.
    private let joined = Mutex<[Int: Int]>([:])
    private let currentRebuild = Mutex<Rebuild?>(nil)
    /// Connections opened for the I/O threads to a replica being added, so
    /// that no I/O thread blocks in a connect (a remote replica can take long).
    private let preparedLinks = Mutex<[PreparedLink]>([])

    /// A libnbd handle connected on another thread, waiting for an I/O thread
    /// to take it: handles are not thread-safe, but may move between threads.
    private struct PreparedLink: @unchecked Sendable {
        var address: SocketAddress
        var client: NBDClient
    }

    public var readOnly: Bool { false }
    /// Replicas take any offset and length; buffers need no alignment here.
    public var alignment: Int { 1 }

    public init(volume: String, volumeID: String = "", size: UInt64, epoch: UInt64, engineID: String, replicas: ReplicaSet,
                gate: WriteGate, replicaTimeoutSeconds: Double = 8, faults: FaultPoints = .fromEnvironment,
                logger: Logger) {
        self.volume = volume
        self.volumeID = volumeID
        self.size = size
        self.epoch = epoch
        self.engineID = engineID
        self.replicas = replicas
        self.gate = gate
        self.replicaTimeoutSeconds = replicaTimeoutSeconds
        replicaTimeout = UInt64(replicaTimeoutSeconds * 1e9)
        self.faults = faults
        self.logger = logger
        keeper = MetadataKeeper(device: self, logger: logger)
        replicas.onChange = { [weak self] in
            self?.keeper.poke()
            self?.wakeWorkers()
        }
        gate.onMarkNeeded = { [weak self] in self?.keeper.poke() }
        gate.onOverlapCleared = { [weak self] in self?.wakeWorkers() }
    }

    public var owner: Owner { Owner(epoch: epoch, engine: engineID) }

    /// The export name that carries this engine's claim to a replica.
    public var replicaExportName: String {
        ReplicaExportName(volume: VolumeIdentity(name: volume, id: volumeID), owner: owner).description
    }

    var ownerMessage: Keel_Control_V1_Owner { owner.message }

    public func makeWorker(ring: Ring, arena: BufferArena) throws -> EngineWorker {
        try EngineWorker(device: self, ring: ring)
    }

    /// Starts the control-plane thread; call before serving.
    public func startKeeper() throws { try keeper.start() }

    /// After the server has stopped: clean dirty regions, persisted membership.
    public func stopKeeper() {
        currentRebuild.withLock { $0 }?.cancel()
        keeper.stop()
    }

    /// Replicas make writes durable on FLUSH and FUA, which the engine forwards.
    public func flush() throws {}

    /// One connection to a replica with this engine's claim: one prepared by
    /// `prepareLinks`, or (at start, before serving) a new one.
    func connect(_ index: Int) throws -> NBDClient {
        let address = replicas.replicas[index].address
        let prepared: NBDClient? = preparedLinks.withLock { links in
            guard let i = links.firstIndex(where: { $0.address == address }) else { return nil }
            return links.remove(at: i).client
        }
        return try prepared ?? connect(address: address)
    }

    /// Opens a connection to `address` for every I/O thread, on this thread.
    func prepareLinks(to address: SocketAddress) throws {
        let clients = try (0..<workerCount).map { _ in try connect(address: address) }
        preparedLinks.withLock { $0 += clients.map { PreparedLink(address: address, client: $0) } }
    }

    /// Connections opened before the engine served (a standby engine's sessions), for its I/O threads.
    public func adopt(_ links: [(SocketAddress, NBDClient)]) {
        preparedLinks.withLock { $0 += links.map { PreparedLink(address: $0.0, client: $0.1) } }
    }

    /// Closes prepared connections no I/O thread took (the replica never joined: it may be unreachable).
    func dropPreparedLinks(to address: SocketAddress) {
        let dropped: [PreparedLink] = preparedLinks.withLock { links in
            defer { links.removeAll { $0.address == address } }
            return links.filter { $0.address == address }
        }
        for link in dropped { link.client.abandon() }
    }

    func connect(address: SocketAddress) throws -> NBDClient {
        let client = try NBDClient()
        try open(client, address: address)
        return client
    }

    /// Connects a prepared client with this engine's claim.
    func open(_ client: NBDClient, address: SocketAddress) throws {
        try client.setExportName(replicaExportName)
        try client.connect(to: address)
    }

    // MARK: - I/O threads

    func register(waker: EventFD) {
        wakers.withLock { $0.append(waker) }
    }

    var workerCount: Int { wakers.withLock { $0.count } }

    /// Lets the I/O threads retry parked writes, release held answers and see replica changes.
    func wakeWorkers() {
        for waker in wakers.withLock({ $0 }) { waker.signal() }
    }

    func workerJoined(_ index: Int) {
        joined.withLock { $0[index, default: 0] += 1 }
    }

    func workersJoined(_ index: Int) -> Int { joined.withLock { $0[index, default: 0] } }

    // MARK: - Rebuild

    var rebuild: Rebuild? { currentRebuild.withLock { $0 } }

    /// Adds replicas in WO mode and starts copying the volume to them, one read for all.
    public func addReplicas(_ addresses: [SocketAddress]) throws {
        guard !replicas.isFenced else { throw EngineError("this engine is fenced: a newer engine owns the volume") }
        try currentRebuild.withLock { current in
            if let current, !current.finished {
                throw EngineError("a rebuild of \(Rebuild.describe(current.addresses)) is running; wait for it to finish")
            }
            current = try Rebuild.start(device: self, addresses: addresses, logger: logger)
        }
    }

    /// Takes a replica out; a rebuild left with no replica to copy to stops (its thread joined).
    public func removeReplica(address: SocketAddress) throws {
        _ = try replicas.remove(address: address)
        if let rebuild, rebuild.indexes.allSatisfy({ replicas.mode($0) != .wo }) { rebuild.cancel() }
    }
}
