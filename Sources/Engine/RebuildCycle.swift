import Logging
import ReplicaIdentity

/// The online rebuild's decisions, one step at a time: mark on the new
/// replica the regions that are not clean, then copy the volume to it region
/// by region, each closed to new writes (`WriteGate`) and quiet while it is
/// copied, from an RW replica (another one when a copy fails), flush it, and
/// make it RW. `Rebuild` performs the steps over libnbd on its own thread;
/// the simulator performs them on its replicas in memory, between other events.
public final class RebuildCycle {
    public enum Step: Equatable {
        /// Copy `range` (all of `region`) from replica `source` to the new one:
        /// the region is closed to writes, none in flight. Answer with `copied`.
        case copy(region: Int, range: ByteRange, source: Int)
        /// Writes are still in flight in the closed region: ask again soon.
        case wait
        /// Every region is copied: flush the new replica. Answer with `flushed`.
        case flush
        /// Over: the replica is RW, failed, or the rebuild was stopped.
        case finished
    }

    private enum State: Equatable {
        case marking
        /// The next region to copy, open to writes.
        case opening(region: Int)
        case closing(region: Int, waits: Int)
        case copying(region: Int, source: Int)
        case flushing
        case finished
    }

    /// The new replica's index in the replica set (WO while this runs).
    public let index: Int
    private let gate: WriteGate
    private let replicas: ReplicaSet
    private let metadata: ReplicaMetadata
    /// How many times `wait` may be answered for one region before the try fails.
    private let maxWaits: Int
    private let isCancelled: () -> Bool
    /// The region is open again: wake the writes that wait for it.
    private let wakeWorkers: () -> Void
    private let logger: Logger
    private var state = State.marking
    /// Sources that failed a copy of the current region.
    private var failedSources = Set<Int>()

    public init(index: Int, gate: WriteGate, replicas: ReplicaSet, metadata: ReplicaMetadata, maxWaits: Int,
                logger: Logger, isCancelled: @escaping () -> Bool = { false }, wakeWorkers: @escaping () -> Void) {
        self.index = index
        self.gate = gate
        self.replicas = replicas
        self.metadata = metadata
        self.maxWaits = maxWaits
        self.logger = logger
        self.isCancelled = isCancelled
        self.wakeWorkers = wakeWorkers
    }

    public var isFinished: Bool { state == .finished }

    /// Stopped from outside, or the replica is no longer WO (failed or removed).
    private var shouldStop: Bool { isCancelled() || replicas.mode(index) != .wo }

    /// What to do now.
    public func next() -> Step {
        if shouldStop, state != .finished {
            if case .closing = state { openRegion() }
            state = .finished
        }
        switch state {
        case .marking:
            markNonCleanRegions()
            return next()
        case .opening(let region) where region == gate.regionCount:
            state = .flushing
            return .flush
        case .opening(let region):
            return close(region, waits: 0, quiet: gate.lockForCopy(region))
        case .closing(let region, let waits):
            return close(region, waits: waits, quiet: gate.isQuiet(region))
        case .copying:
            preconditionFailure("rebuild: next() before the copy's answer")
        case .flushing:
            return .flush
        case .finished:
            return .finished
        }
    }

    /// The answer to `.copy`.
    public func copied(_ result: Result<Void, Error>) {
        guard case .copying(let region, let source) = state else { preconditionFailure("rebuild: copied() without a copy") }
        switch result {
        case .success:
            // Before the region opens: its next writes must reach the new replica (`ReplicaSet.takesWrite`).
            replicas.rebuilt(index, bytes: span(of: region).end)
            openRegion()
            failedSources = []
            state = .opening(region: region + 1)
        case .failure(let error):
            openRegion()
            tryAnotherSource(region, after: source, error)
        }
    }

    /// The answer to `.flush`.
    public func flushed(_ result: Result<Void, Error>) {
        precondition(state == .flushing, "rebuild: flushed() without a flush")
        state = .finished
        switch result {
        case .success:
            if replicas.promote(index) {
                logger.notice("replica \(replicas.replicas[index].address) rebuilt: now RW")
            }
        case .failure(let error):
            if !shouldStop { replicas.fail(index, reason: "rebuild failed: flush: \(error)") }
        }
    }

    /// Regions dirty (or being marked) when the replica joins are marked on it
    /// too: once it is RW, its own log must cover them. Later ones the keeper
    /// marks on every writable replica, this one included.
    private func markNonCleanRegions() {
        state = .opening(region: 0)
        let spans = gate.nonCleanRegions().map { region in
            let range = gate.range(of: region)
            return ByteRange(offset: range.offset, length: range.length)
        }
        guard !spans.isEmpty else { return }
        switch metadata.run(.markDirty(spans), on: [index])[index] ?? .failed("no answer") {
        case .done:
            break
        case .notOwner:
            replicas.fence(by: index)
            state = .finished
        case .failed(let reason):
            replicas.fail(index, reason: "rebuild failed: cannot mark dirty regions: \(reason)")
            state = .finished
        }
    }

    /// The region is closed; copies once no write is in flight there, from
    /// the first RW replica that has not failed a copy of it. The source is
    /// chosen only now: one that failed a write went ERR before the region was quiet.
    private func close(_ region: Int, waits: Int, quiet: Bool) -> Step {
        guard quiet else {
            guard waits < maxWaits else {
                openRegion()
                replicas.fail(index, reason: "rebuild failed: writes to region \(region) did not finish")
                state = .finished
                return .finished
            }
            state = .closing(region: region, waits: waits + 1)
            return .wait
        }
        let candidates = replicas.replicas.indices.filter {
            $0 != index && replicas.mode($0) == .rw && !failedSources.contains($0)
        }
        guard let source = candidates.first else {
            openRegion()
            let why = failedSources.isEmpty ? "no healthy replica to copy from" : "every source failed to copy region \(region)"
            replicas.fail(index, reason: "rebuild failed: \(why)")
            state = .finished
            return .finished
        }
        state = .copying(region: region, source: source)
        return .copy(region: region, range: span(of: region), source: source)
    }

    /// A try failed: the source may have died. The region opens again (writes
    /// there wait no longer than one try) and is copied from another replica,
    /// each tried once; if the new replica itself is gone, every try fails.
    private func tryAnotherSource(_ region: Int, after source: Int, _ error: Error) {
        guard !shouldStop else {
            state = .finished
            return
        }
        logger.warning("rebuild of \(replicas.replicas[index].address): copying region \(region) from replica \(source) failed (\(error)); trying another source")
        failedSources.insert(source)
        state = .opening(region: region)
    }

    /// The region's bytes, the last one clipped to the volume.
    private func span(of region: Int) -> ByteRange {
        let range = gate.range(of: region)
        return ByteRange(offset: range.offset, length: min(range.length, gate.size - range.offset))
    }

    private func openRegion() {
        gate.unlockCopy()
        wakeWorkers()
    }
}
