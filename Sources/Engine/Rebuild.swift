import ControlAPI
import LibNBD
import Logging
import ReplicaIdentity
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Brings a new replica up to date while the volume keeps serving.
///
/// It gets the volume's snapshots first (`ChainCopy`). Then it joins in
/// WO mode: from the moment every I/O thread is
/// connected to it, it receives every new write. Then the volume is copied
/// to it region by region from an RW replica (holes as WRITE_ZEROES). Each
/// region is closed to new writes while it is copied (`WriteGate`), so a copy
/// never overwrites a newer write. When the last region is done the replica
/// becomes RW.
final class Rebuild: @unchecked Sendable {
    let address: SocketAddress
    let index: Int
    private unowned let device: EngineDevice
    private let logger: Logger
    private let stopRequested = Atomic<Bool>(false)
    private let done = Atomic<Bool>(false)
    private let joined = Atomic<Bool>(false)
    private var thread: PosixThread?
    /// The replica holds the volume's snapshots (`ChainCopy`): only what
    /// changed since the newest (this context of the source) is copied.
    private let changedContext: String?
    /// The `break-rebuild-source` fault point fires once.
    private var brokeSource = false

    var finished: Bool { done.load(ordering: .acquiring) }

    private init(device: EngineDevice, address: SocketAddress, index: Int, newestSnapshot: String?, logger: Logger) {
        self.device = device
        changedContext = newestSnapshot.map { ChangedBlocksContext.name(since: $0) }
        self.address = address
        self.index = index
        self.logger = logger
    }

    /// Checks the replica (reachable, a Keel replica of the volume's size, not
    /// owned by a newer engine), claims it, adds it in WO mode and starts copying.
    static func start(device: EngineDevice, address: SocketAddress, logger: Logger) throws -> Rebuild {
        let controlAddress = defaultControlAddress(forData: address)
        let status: Keel_Control_V1_ReplicaStatus
        do {
            status = try ReplicaControlClient(address: controlAddress).call(timeout: device.replicaTimeoutSeconds) {
                try await $0.status(.init(), options: $1)
            }
        } catch {
            throw EngineError("cannot reach the control API of \(address) at \(controlAddress): \(error)")
        }
        guard status.size == device.size else {
            throw EngineError("replica \(address) holds \(status.size) bytes but the volume is \(device.size); nothing was changed")
        }
        do {
            let probe = try NBDClient()
            try probe.setOptionMode(true)
            try probe.connect(to: address)
            _ = try VolumeStartup.checkListing(try probe.listExports(), of: address,
                                               for: VolumeIdentity(name: device.volume, id: device.volumeID))
            try? probe.abortOptions()
        } catch let error as EngineError {
            throw error
        } catch {
            throw EngineError("cannot list the exports of replica \(address): \(error)")
        }
        guard status.owner.epoch <= device.epoch else {
            throw EngineError("replica \(address) belongs to a newer engine (epoch \(status.owner.epoch) > \(device.epoch))")
        }
        do {
            let claim = try device.connect(address: address)
            try? claim.shutdown()
        } catch {
            throw EngineError("replica \(address) refused this engine's epoch \(device.epoch): \(error)")
        }
        // The chain copy overwrites its head with older snapshots' data: if it
        // failed a moment ago, the recorded membership may still name it, and
        // an engine started after a crash would trust that head.
        guard device.replicas.waitUntilMembershipRecorded(seconds: device.replicaTimeoutSeconds * 2) else {
            throw EngineError("the membership without replica \(address) is not recorded yet; the replica was not added (try again)")
        }
        // Its chain first, before it joins (joined, it would take writes into the head it freezes).
        let newestSnapshot: String?
        do {
            device.copyingChain.withLock { $0 = address }
            defer { device.copyingChain.withLock { $0 = nil } }
            newestSnapshot = try ChainCopy(device: device, target: address,
                                           targetControl: try ReplicaControlClient(address: controlAddress),
                                           targetSnapshots: status.snapshots.map(\.name), logger: logger).run()
        } catch let error as EngineError {
            throw EngineError("\(error); the replica was not added")
        }
        // The I/O threads take these connections when the replica joins: none of them blocks in a connect.
        let index: Int
        do {
            try device.prepareLinks(to: address)
            index = try device.replicas.add(address: address, controlAddress: controlAddress, id: status.id)
        } catch {
            device.dropPreparedLinks(to: address)
            throw error
        }
        let rebuild = Rebuild(device: device, address: address, index: index, newestSnapshot: newestSnapshot, logger: logger)
        rebuild.thread = try PosixThread(name: "keel-rebuild") { rebuild.run() }
        logger.notice("replica \(address) (\(status.id)) added in WO mode; rebuilding")
        return rebuild
    }

    /// Stops the copy and waits for the thread; safe to call more than once, from any thread.
    func cancel() {
        stopRequested.store(true, ordering: .releasing)
        if joined.exchange(true, ordering: .acquiringAndReleasing) == false { thread?.join() }
    }

    private func run() {
        defer {
            device.dropPreparedLinks(to: address)
            done.store(true, ordering: .releasing)
        }
        do { try waitForWorkers() } catch {
            if !isCancelled { device.replicas.fail(index, reason: "rebuild failed: \(error)") }
            return
        }
        // Writes in flight finish, or their replica is failed, within the replica timeout.
        let cycle = RebuildCycle(index: index, gate: device.gate, replicas: device.replicas,
                                 metadata: ControlAPIMetadata(device: device),
                                 maxWaits: Int(device.replicaTimeoutSeconds * 10_000) + 10_000, logger: logger,
                                 isCancelled: { [self] in isCancelled }) { [device] in device.wakeWorkers() }
        var copier: RegionCopier?
        while true {
            switch cycle.next() {
            case .wait:
                usleep(100)
            case .copy(let region, let range, let source):
                cycle.copied(Result {
                    do {
                        if copier?.sourceIndex != source { copier = try openCopier(from: source) }
                        injectSourceFault(region, copier!)
                        try copier!.copy(offset: range.offset, length: range.length)
                    } catch {
                        copier = nil
                        throw error
                    }
                    if device.faults.slowRebuildSeconds > 0 { usleep(UInt32(device.faults.slowRebuildSeconds * 1e6)) }
                })
            case .flush:
                cycle.flushed(Result {
                    try (copier?.targets[0] ?? openTarget()).flush()
                })
            case .finished:
                return
            }
        }
    }

    private var isCancelled: Bool { stopRequested.load(ordering: .acquiring) }

    /// Every I/O thread must send new writes to the replica before any region is copied.
    private func waitForWorkers() throws {
        device.wakeWorkers()
        for _ in 0..<3000 {
            if isCancelled || device.replicas.mode(index) != .wo { throw EngineError("stopped") }
            if device.workersJoined(index) >= device.workerCount { return }
            usleep(10_000)
        }
        throw EngineError("the I/O threads did not connect to the replica within 30 s")
    }

    private func injectSourceFault(_ region: Int, _ copier: RegionCopier) {
        guard device.faults.breakRebuildSourceAtRegion == region, !brokeSource else { return }
        brokeSource = true
        logger.warning("fault point: breaking the rebuild's link to its source before region \(region)")
        shutdown(copier.source.descriptor, Int32(SHUT_RDWR))
    }

    private func openCopier(from source: Int) throws -> RegionCopier {
        RegionCopier(source: try open(source, changedContext: changedContext), targets: [try openTarget()],
                     timeoutSeconds: device.replicaTimeoutSeconds, sourceIndex: source, changedContext: changedContext)
    }

    private func openTarget() throws -> NBDClient { try open(index) }

    private func open(_ replica: Int, changedContext: String? = nil) throws -> NBDClient {
        try RegionCopier.connect(changedContext: changedContext) {
            try device.open($0, address: device.replicas.replicas[replica].address)
        }
    }
}
