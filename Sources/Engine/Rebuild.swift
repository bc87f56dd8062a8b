import ControlAPI
import LibNBD
import Logging
import ReplicaIdentity
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Brings new replicas up to date while the volume keeps serving.
///
/// Each gets the volume's snapshots first (`ChainCopy`). Then they join in
/// WO mode: from the moment every I/O thread is connected to them, they
/// receive the writes behind the copy. Then the volume is copied to them
/// region by region from an RW replica (holes as WRITE_ZEROES), one read for
/// all of them. Each region is closed to new writes while it is copied
/// (`WriteGate`), so a copy never overwrites a newer write. When the last
/// region is done they become RW; one that fails meanwhile is dropped alone.
final class Rebuild: @unchecked Sendable {
    let addresses: [SocketAddress]
    let indexes: [Int]
    private unowned let device: EngineDevice
    private let logger: Logger
    private let stopRequested = Atomic<Bool>(false)
    private let done = Atomic<Bool>(false)
    private let joined = Atomic<Bool>(false)
    private var thread: PosixThread?
    /// The replicas hold the volume's snapshots (`ChainCopy`): only what
    /// changed since the newest (this context of the source) is copied.
    private let changedContext: String?
    /// The `break-rebuild-source` fault point fires once.
    private var brokeSource = false

    var finished: Bool { done.load(ordering: .acquiring) }

    private init(device: EngineDevice, addresses: [SocketAddress], indexes: [Int], newestSnapshot: String?, logger: Logger) {
        self.device = device
        changedContext = newestSnapshot.map { ChangedBlocksContext.name(since: $0) }
        self.addresses = addresses
        self.indexes = indexes
        self.logger = logger
    }

    /// A replica checked and claimed, not yet a member.
    private struct Joining {
        let address: SocketAddress
        let controlAddress: SocketAddress
        let status: Keel_Control_V1_ReplicaStatus
    }

    /// Checks each replica (reachable, a Keel replica of the volume's size, not
    /// owned by a newer engine), claims it, gives it the volume's snapshots,
    /// adds them all in WO mode and starts copying. Nothing is added if this throws.
    static func start(device: EngineDevice, addresses: [SocketAddress], logger: Logger) throws -> Rebuild {
        precondition(!addresses.isEmpty, "rebuild: no replica to add")
        for (i, address) in addresses.enumerated() where addresses[..<i].contains(address) {
            throw EngineError("replica \(address) is named twice; nothing was changed")
        }
        let joining = try addresses.map { try check(device: device, address: $0) }
        for (i, replica) in joining.enumerated() where joining[..<i].contains(where: { $0.status.id == replica.status.id }) {
            throw EngineError("replica \(replica.address) is the same replica (\(replica.status.id)) as another one named; nothing was changed")
        }
        // The chain copy overwrites its head with older snapshots' data: if it
        // failed a moment ago, the recorded membership may still name it, and
        // an engine started after a crash would trust that head.
        guard device.replicas.waitUntilMembershipRecorded(seconds: device.replicaTimeoutSeconds * 2) else {
            throw EngineError("the membership without \(describe(addresses)) is not recorded yet; nothing was added (try again)")
        }
        // Their chains first, before they join (joined, they would take writes into the head it freezes).
        // Snapshots are refused until every one has its chain: all end at the same newest snapshot.
        var newestSnapshot: String?
        defer { device.copyingChain.withLock { $0 = nil } }
        for replica in joining {
            device.copyingChain.withLock { $0 = replica.address }
            do {
                newestSnapshot = try ChainCopy(device: device, target: replica.address,
                                               targetControl: try ReplicaControlClient(address: replica.controlAddress),
                                               targetSnapshots: replica.status.snapshots.map(\.name), logger: logger).run()
            } catch let error as EngineError {
                throw EngineError("\(error); nothing was added")
            } catch {
                throw EngineError("giving replica \(replica.address) the volume's snapshots failed: \(error); nothing was added")
            }
        }
        // The I/O threads take these connections when the replicas join: none of them blocks in a connect.
        var indexes: [Int] = []
        let undo = {
            for replica in joining { device.dropPreparedLinks(to: replica.address) }
            for index in indexes { _ = try? device.replicas.remove(address: device.replicas.replicas[index].address) }
        }
        do {
            for replica in joining {
                try device.prepareLinks(to: replica.address)
                indexes.append(try device.replicas.add(address: replica.address, controlAddress: replica.controlAddress,
                                                       id: replica.status.id))
            }
        } catch {
            undo()
            throw error
        }
        let rebuild = Rebuild(device: device, addresses: addresses, indexes: indexes, newestSnapshot: newestSnapshot, logger: logger)
        do { rebuild.thread = try PosixThread(name: "keel-rebuild") { rebuild.run() } } catch {
            undo()
            throw EngineError("cannot start the rebuild's thread: \(error); nothing was added")
        }
        for replica in joining {
            logger.notice("replica \(replica.address) (\(replica.status.id)) added in WO mode; rebuilding")
        }
        return rebuild
    }

    private static func check(device: EngineDevice, address: SocketAddress) throws -> Joining {
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
        // Before anything touches it: the chain copy would rewrite a member's head under its writes.
        if let member = device.replicas.replicas.first(where: { $0.mode.isWritable && ($0.address == address || $0.id == status.id) }) {
            throw EngineError("replica \(member.address) with this identity is already in the volume (\(member.mode.rawValue)); nothing was changed")
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
        return Joining(address: address, controlAddress: controlAddress, status: status)
    }

    static func describe(_ addresses: [SocketAddress]) -> String {
        addresses.map { "\($0)" }.joined(separator: ", ")
    }

    /// Stops the copy and waits for the thread; safe to call more than once, from any thread.
    func cancel() {
        stopRequested.store(true, ordering: .releasing)
        if joined.exchange(true, ordering: .acquiringAndReleasing) == false { thread?.join() }
    }

    private func run() {
        defer {
            for address in addresses { device.dropPreparedLinks(to: address) }
            done.store(true, ordering: .releasing)
        }
        do { try waitForWorkers() } catch {
            if !isCancelled {
                for index in indexes { device.replicas.fail(index, reason: "rebuild failed: \(error)") }
            }
            return
        }
        // Writes in flight finish, or their replica is failed, within the replica timeout.
        let cycle = RebuildCycle(indexes: indexes, gate: device.gate, replicas: device.replicas,
                                 metadata: ControlAPIMetadata(device: device),
                                 maxWaits: Int(device.replicaTimeoutSeconds * 10_000) + 10_000, logger: logger,
                                 isCancelled: { [self] in isCancelled }) { [device] in device.wakeWorkers() }
        var copier: Copier?
        while true {
            switch cycle.next() {
            case .wait:
                usleep(100)
            case .copy(let region, let range, let source, let targets):
                cycle.copied(Result {
                    do {
                        if copier?.source != source { copier = try openCopier(from: source, to: targets) }
                        copier!.keep(targets)
                        injectSourceFault(region, copier!.regions)
                        try copier!.regions.copy(offset: range.offset, length: range.length)
                    } catch {
                        // After a failure no connection is trusted: a deadline shuts them all down.
                        let failedTarget = (error as? RegionCopier.TargetFailure).map { copier?.targets[$0.target] }
                        copier = nil
                        if let index = failedTarget ?? nil { throw RebuildCycle.TargetFailed(index: index, reason: "\(error)") }
                        throw error
                    }
                    if device.faults.slowRebuildSeconds > 0 { usleep(UInt32(device.faults.slowRebuildSeconds * 1e6)) }
                })
            case .flush(let targets):
                cycle.flushed(Result {
                    for index in targets {
                        do { try (copier?.connection(to: index) ?? openTarget(index)).flush() } catch {
                            throw RebuildCycle.TargetFailed(index: index, reason: "\(error)")
                        }
                    }
                })
            case .finished:
                return
            }
        }
    }

    /// The copy's connections: one to the source, one to each new replica still rebuilt.
    private struct Copier {
        let source: Int
        private(set) var targets: [Int]
        private(set) var regions: RegionCopier

        init(source: Int, targets: [Int], regions: RegionCopier) {
            self.source = source
            self.targets = targets
            self.regions = regions
        }

        /// Drops the connections of new replicas that left the rebuild (failed or removed).
        mutating func keep(_ indexes: [Int]) {
            guard indexes != targets else { return }
            precondition(indexes.allSatisfy(targets.contains), "rebuild: a new replica joined the copy half way")
            let kept = targets.indices.filter { indexes.contains(targets[$0]) }
            for position in targets.indices where !kept.contains(position) { try? regions.targets[position].shutdown() }
            targets = kept.map { targets[$0] }
            regions = RegionCopier(source: regions.source, targets: kept.map { regions.targets[$0] },
                                   timeoutSeconds: regions.timeoutSeconds, changedContext: regions.changedContext)
        }

        func connection(to index: Int) -> NBDClient? {
            targets.firstIndex(of: index).map { regions.targets[$0] }
        }
    }

    private var isCancelled: Bool { stopRequested.load(ordering: .acquiring) }

    /// Every I/O thread must be connected to the new replicas before any region is copied.
    private func waitForWorkers() throws {
        device.wakeWorkers()
        for _ in 0..<3000 {
            if isCancelled || indexes.allSatisfy({ device.replicas.mode($0) != .wo }) { throw EngineError("stopped") }
            if indexes.allSatisfy({ device.replicas.mode($0) != .wo || device.workersJoined($0) >= device.workerCount }) {
                return
            }
            usleep(10_000)
        }
        throw EngineError("the I/O threads did not connect to the new replicas within 30 s")
    }

    private func injectSourceFault(_ region: Int, _ copier: RegionCopier) {
        guard device.faults.breakRebuildSourceAtRegion == region, !brokeSource else { return }
        brokeSource = true
        logger.warning("fault point: breaking the rebuild's link to its source before region \(region)")
        shutdown(copier.source.descriptor, Int32(SHUT_RDWR))
    }

    /// Opens the source first, then each target: a target that cannot be reached fails alone.
    private func openCopier(from source: Int, to targets: [Int]) throws -> Copier {
        let reader = try open(source, changedContext: changedContext)
        var writers: [NBDClient] = []
        for index in targets {
            do { writers.append(try openTarget(index)) } catch {
                try? reader.shutdown()
                for writer in writers { try? writer.shutdown() }
                throw RebuildCycle.TargetFailed(index: index, reason: "cannot connect: \(error)")
            }
        }
        return Copier(source: source, targets: targets,
                      regions: RegionCopier(source: reader, targets: writers, timeoutSeconds: device.replicaTimeoutSeconds,
                                            changedContext: changedContext))
    }

    private func openTarget(_ index: Int) throws -> NBDClient { try open(index) }

    private func open(_ replica: Int, changedContext: String? = nil) throws -> NBDClient {
        try RegionCopier.connect(changedContext: changedContext) {
            try device.open($0, address: device.replicas.replicas[replica].address)
        }
    }
}
