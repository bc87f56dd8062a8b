import Logging
import ReplicaIdentity

/// The metadata keeper's decisions, one step at a time and on one thread:
/// mark regions before writes go there, persist each membership generation
/// (acknowledgements wait for it), clear regions idle for `idleTicks` ticks.
/// `MetadataKeeper` runs it on its own thread with a monotonic clock; the
/// simulator runs it between other events with its own.
/// A replica that fails a call is failed like one that fails I/O; one that
/// says it belongs to a newer engine fences this one.
public final class KeeperCycle {
    let gate: WriteGate
    let replicas: ReplicaSet
    let metadata: ReplicaMetadata
    let epoch: UInt64
    /// Something let writes go on: wake the I/O threads.
    let wakeWorkers: () -> Void
    /// Test fault point: runs before each membership call.
    var beforeMembership: () -> Void = {}
    let logger: Logger
    /// Clearing waits this many idle ticks, so that busy regions are not marked and cleared in turn.
    public static let idleTicks: UInt32 = 3

    public init(gate: WriteGate, replicas: ReplicaSet, metadata: ReplicaMetadata, epoch: UInt64,
                logger: Logger, wakeWorkers: @escaping () -> Void) {
        self.gate = gate
        self.replicas = replicas
        self.metadata = metadata
        self.epoch = epoch
        self.logger = logger
        self.wakeWorkers = wakeWorkers
    }

    /// Persists generations until the newest is on every writable replica
    /// (a replica that fails this is failed, which makes a newer generation).
    public func persistMembership() {
        for _ in 0...ReplicaSet.capacity {
            guard replicas.holdsAcknowledgements else { return }
            beforeMembership()
            let (generation, members) = replicas.membership
            guard !members.isEmpty else {
                // No replica holds every acknowledged write any more: the last
                // record, which names the failed ones, stays the truth (an empty
                // one, left on a replica being rebuilt, would leave the volume
                // unable to start). No write is acknowledged from here on.
                replicas.persisted(generation: generation)
                wakeWorkers()
                return
            }
            let failed = onWritableReplicas("cannot record the membership",
                                            .setMembership(generation: generation, members: members))
            if !failed {
                logger.info("membership \(epoch).\(generation): \(members.count) replica(s) in sync")
                replicas.persisted(generation: generation)
                wakeWorkers()
                return
            }
        }
    }

    /// Marks the regions writes asked for on every writable replica; a replica
    /// that fails the call is failed (so every writable one left has the
    /// marks). Fenced, nothing is marked: the parked writes are woken and answered EIO.
    public func markRequested() {
        let regions = gate.takeRegionsToMark()
        guard !regions.isEmpty else { return }
        onWritableReplicas("cannot mark dirty regions", .markDirty(spans(regions)))
        if !replicas.isFenced { gate.marked(regions) }
        wakeWorkers()
    }

    /// One tick of the idle clock: clears the regions idle long enough.
    public func tick() {
        gate.tick()
        clear(gate.beginClearing(idleTicks: Self.idleTicks))
    }

    /// At a clean stop, after every write was answered by every writable replica.
    public func clearEverything() {
        clear(gate.beginClearing(idleTicks: 0))
    }

    private func clear(_ regions: [Int]) {
        guard !regions.isEmpty else { return }
        onWritableReplicas("cannot clear dirty regions", .clearDirty(spans(regions)))
        gate.cleared(regions, succeeded: true)
        wakeWorkers()
    }

    private func spans(_ regions: [Int]) -> [ByteRange] {
        regions.map { region in
            let range = gate.range(of: region)
            return ByteRange(offset: range.offset, length: range.length)
        }
    }

    /// Runs a call on every writable replica at once; fails those that fail it.
    /// Returns whether any failed.
    @discardableResult
    private func onWritableReplicas(_ what: String, _ call: MetadataCall) -> Bool {
        // A fenced engine asks nothing of replicas that belong to another engine now.
        guard !replicas.isFenced else { return true }
        let targets = replicas.replicas.enumerated().filter { $0.element.mode.isWritable }.map(\.offset)
        let answers = metadata.run(call, on: targets)
        var failed = false
        for index in targets {
            switch answers[index] ?? .failed("no answer") {
            case .done:
                continue
            case .notOwner:
                failed = true
                replicas.fence(by: index)
            case .failed(let reason):
                failed = true
                replicas.fail(index, reason: "\(what): \(reason)")
            }
        }
        return failed
    }
}
