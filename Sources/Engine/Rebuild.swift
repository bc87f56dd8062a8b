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
/// The replica joins in WO mode: from the moment every I/O thread is
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
    /// The `break-rebuild-source` fault point fires once.
    private var brokeSource = false

    var finished: Bool { done.load(ordering: .acquiring) }

    private init(device: EngineDevice, address: SocketAddress, index: Int, logger: Logger) {
        self.device = device
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
        // The I/O threads take these connections when the replica joins: none of them blocks in a connect.
        let index: Int
        do {
            try device.prepareLinks(to: address)
            index = try device.replicas.add(address: address, controlAddress: controlAddress, id: status.id)
        } catch {
            device.dropPreparedLinks(to: address)
            throw error
        }
        let rebuild = Rebuild(device: device, address: address, index: index, logger: logger)
        rebuild.thread = try PosixThread(name: "keel-rebuild") { rebuild.run() }
        logger.notice("replica \(address) (\(status.id)) added in WO mode; rebuilding")
        return rebuild
    }

    /// Stops the copy and waits for the thread; safe to call more than once, from any thread.
    func cancel() {
        stopRequested.store(true, ordering: .releasing)
        if joined.exchange(true, ordering: .acquiringAndReleasing) == false { thread?.join() }
    }

    private var shouldStop: Bool {
        stopRequested.load(ordering: .acquiring) || device.replicas.mode(index) != .wo
    }

    private func run() {
        defer {
            device.dropPreparedLinks(to: address)
            done.store(true, ordering: .releasing)
        }
        do {
            try waitForWorkers()
            try markDirtyRegions()
            var copier = try openCopier()
            let gate = device.gate
            for region in 0..<gate.regionCount {
                if shouldStop { return }
                let range = gate.range(of: region)
                let length = min(range.length, device.size - range.offset)
                try copy(region, offset: range.offset, length: length, with: &copier)
                device.replicas.rebuilt(index, bytes: range.offset + length)
                if device.faults.slowRebuildSeconds > 0 { usleep(UInt32(device.faults.slowRebuildSeconds * 1e6)) }
            }
            try copier.targets[0].flush()
            if device.replicas.promote(index) {
                logger.notice("replica \(address) rebuilt: now RW")
            }
        } catch {
            if !shouldStop { device.replicas.fail(index, reason: "rebuild failed: \(error)") }
        }
    }

    /// Every I/O thread must send new writes to the replica before any region is copied.
    private func waitForWorkers() throws {
        device.wakeWorkers()
        for _ in 0..<3000 {
            if shouldStop { throw EngineError("stopped") }
            if device.workersJoined(index) >= device.workerCount { return }
            usleep(10_000)
        }
        throw EngineError("the I/O threads did not connect to the replica within 30 s")
    }

    /// Regions that are dirty (or being marked) when the replica joins are
    /// marked on it too: once it is RW, its own log must cover them.
    private func markDirtyRegions() throws {
        let regions = device.gate.nonCleanRegions()
        guard !regions.isEmpty else { return }
        let request = Keel_Control_V1_DirtyRanges.with { request in
            request.owner = device.ownerMessage
            request.ranges = regions.map { region in
                let range = device.gate.range(of: region)
                return .with { $0.offset = range.offset; $0.length = range.length }
            }
        }
        _ = try ReplicaControlClient(address: device.replicas.replicas[index].controlAddress)
            .call(timeout: device.replicaTimeoutSeconds) { try await $0.markDirty(request, options: $1) }
    }

    /// Copies one region, closed to new writes while each try runs. When a
    /// try fails, the source may have died: the region is opened again (writes
    /// there wait no longer than one try) and copied from another healthy
    /// replica, each tried once; if the new replica itself is gone, every try
    /// fails, and so does the rebuild.
    private func copy(_ region: Int, offset: UInt64, length: UInt64, with copier: inout RegionCopier) throws {
        var failedSources = Set<Int>()
        for _ in 0...ReplicaSet.capacity {
            do {
                try closed(region) {
                    // The source must still hold every write: one that failed a write went ERR
                    // before the region was quiet, so checking here, under the lock, suffices.
                    if device.replicas.mode(copier.sourceIndex) != .rw { copier = try openCopier(excluding: failedSources) }
                    injectSourceFault(region, copier)
                    try copier.copy(offset: offset, length: length)
                }
                return
            } catch {
                if shouldStop { throw error }
                failedSources.insert(copier.sourceIndex)
                logger.warning("rebuild of \(address): copying \(length) bytes at \(offset) from replica \(copier.sourceIndex) failed (\(error)); trying another source")
                copier = try openCopier(excluding: failedSources)
            }
        }
        throw EngineError("no source could copy \(length) bytes at \(offset)")
    }

    private func injectSourceFault(_ region: Int, _ copier: RegionCopier) {
        guard device.faults.breakRebuildSourceAtRegion == region, !brokeSource else { return }
        brokeSource = true
        logger.warning("fault point: breaking the rebuild's link to its source before region \(region)")
        shutdown(copier.source.descriptor, Int32(SHUT_RDWR))
    }

    private func openCopier(excluding failed: Set<Int> = []) throws -> RegionCopier {
        let replicas = device.replicas.replicas
        guard let source = replicas.indices.first(where: { replicas[$0].mode == .rw && !failed.contains($0) }) else {
            throw EngineError("no healthy replica to copy from")
        }
        let open = { (i: Int) in try RegionCopier.connect { try self.device.open($0, address: self.device.replicas.replicas[i].address) } }
        return RegionCopier(source: try open(source), targets: [try open(index)],
                            timeoutSeconds: device.replicaTimeoutSeconds, sourceIndex: source)
    }

    /// Runs `body` with the region closed to new writes and none in flight.
    private func closed(_ region: Int, _ body: () throws -> Void) throws {
        defer {
            device.gate.unlockCopy()
            device.wakeWorkers()
        }
        var quiet = device.gate.lockForCopy(region)
        // Writes in flight finish, or their replica is failed, within the replica timeout.
        let limit = Int(device.replicaTimeoutSeconds * 10_000) + 10_000
        for _ in 0..<limit where !quiet {
            usleep(100)
            quiet = device.gate.isQuiet(region)
        }
        guard quiet else { throw EngineError("writes to region \(region) did not finish") }
        try body()
    }
}
