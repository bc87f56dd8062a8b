import Logging
import ReplicaIdentity

/// The online rebuild's decisions, one step at a time: mark on the new
/// replicas the regions that are not clean, then copy the volume to them
/// region by region, each closed to new writes (`WriteGate`) and quiet while
/// it is copied, from an RW replica (another one when a copy fails), flush
/// them, and make them RW. Several new replicas are rebuilt in one pass: each
/// region is read once for all of them, and one that fails is dropped alone.
/// `Rebuild` performs the steps over libnbd on its own thread; the simulator
/// performs them on its replicas in memory, between other events.
public final class RebuildCycle {
    public enum Step: Equatable {
        /// Copy `range` (all of `region`) from replica `source` to the new ones in
        /// `targets`: the region is closed to writes, none in flight. Answer with `copied`.
        case copy(region: Int, range: ByteRange, source: Int, targets: [Int])
        /// Writes are still in flight in the closed region: ask again soon.
        case wait
        /// Every region is copied: flush the new replicas. Answer with `flushed`.
        case flush(targets: [Int])
        /// Over: every new replica is RW or failed, or the rebuild was stopped.
        case finished
    }

    /// A copy or flush that failed on one new replica (not on the source): that one alone is failed.
    public struct TargetFailed: Error, CustomStringConvertible {
        public let index: Int
        public let reason: String
        public init(index: Int, reason: String) {
            self.index = index
            self.reason = reason
        }
        public var description: String { reason }
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

    /// The new replicas' indexes in the replica set (WO while this runs), in the order they joined.
    public let indexes: [Int]
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

    public init(indexes: [Int], gate: WriteGate, replicas: ReplicaSet, metadata: ReplicaMetadata, maxWaits: Int,
                logger: Logger, isCancelled: @escaping () -> Bool = { false }, wakeWorkers: @escaping () -> Void) {
        precondition(!indexes.isEmpty, "rebuild: no replica to rebuild")
        self.indexes = indexes
        self.gate = gate
        self.replicas = replicas
        self.metadata = metadata
        self.maxWaits = maxWaits
        self.logger = logger
        self.isCancelled = isCancelled
        self.wakeWorkers = wakeWorkers
    }

    public var isFinished: Bool { state == .finished }

    /// The new replicas still WO (not failed or removed).
    public var targets: [Int] { indexes.filter { replicas.mode($0) == .wo } }

    /// Stopped from outside, or no new replica is WO any more.
    private var shouldStop: Bool { isCancelled() || targets.isEmpty }

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
            return .flush(targets: targets)
        case .opening(let region):
            return close(region, waits: 0, quiet: gate.lockForCopy(region))
        case .closing(let region, let waits):
            return close(region, waits: waits, quiet: gate.isQuiet(region))
        case .copying:
            preconditionFailure("rebuild: next() before the copy's answer")
        case .flushing:
            return .flush(targets: targets)
        case .finished:
            return .finished
        }
    }

    /// The answer to `.copy`: a `TargetFailed` fails that new replica and the
    /// region is copied again to the others; any other error is the source's.
    public func copied(_ result: Result<Void, Error>) {
        guard case .copying(let region, let source) = state else { preconditionFailure("rebuild: copied() without a copy") }
        switch result {
        case .success:
            // Before the region opens: its next writes must reach the new replicas (`ReplicaSet.takesWrite`).
            for index in targets { replicas.rebuilt(index, bytes: span(of: region).end) }
            openRegion()
            failedSources = []
            state = .opening(region: region + 1)
        case .failure(let failure as TargetFailed):
            precondition(indexes.contains(failure.index), "rebuild: a copy failed on \(failure.index), not a new replica")
            openRegion()
            replicas.fail(failure.index, reason: "rebuild failed: copying region \(region) to it: \(failure.reason)")
            state = .opening(region: region)
        case .failure(let error):
            openRegion()
            tryAnotherSource(region, after: source, error)
        }
    }

    /// The answer to `.flush`: a `TargetFailed` fails that new replica and the
    /// others are flushed again; any other error fails them all.
    public func flushed(_ result: Result<Void, Error>) {
        precondition(state == .flushing, "rebuild: flushed() without a flush")
        switch result {
        case .success:
            state = .finished
            for index in targets where replicas.promote(index) {
                logger.notice("replica \(replicas.replicas[index].address) rebuilt: now RW")
            }
        case .failure(let failure as TargetFailed):
            precondition(indexes.contains(failure.index), "rebuild: a flush failed on \(failure.index), not a new replica")
            replicas.fail(failure.index, reason: "rebuild failed: flush: \(failure.reason)")
        case .failure(let error):
            state = .finished
            if !isCancelled() {
                failAll("rebuild failed: flush: \(error)")
            }
        }
    }

    /// Regions dirty (or being marked) when the replicas join are marked on
    /// them too: once RW, their own logs must cover them. Later ones the keeper
    /// marks on every writable replica, these included.
    private func markNonCleanRegions() {
        state = .opening(region: 0)
        let spans = gate.nonCleanRegions().map { region in
            let range = gate.range(of: region)
            return ByteRange(offset: range.offset, length: range.length)
        }
        guard !spans.isEmpty else { return }
        let answers = metadata.run(.markDirty(spans), on: targets)
        for index in targets {
            switch answers[index] ?? .failed("no answer") {
            case .done:
                break
            case .notOwner:
                replicas.fence(by: index)
                state = .finished
            case .failed(let reason):
                replicas.fail(index, reason: "rebuild failed: cannot mark dirty regions: \(reason)")
            }
        }
    }

    /// The region is closed; copies once no write is in flight there, from
    /// the first RW replica that has not failed a copy of it. The source is
    /// chosen only now: one that failed a write went ERR before the region was quiet.
    private func close(_ region: Int, waits: Int, quiet: Bool) -> Step {
        guard quiet else {
            guard waits < maxWaits else {
                openRegion()
                failAll("rebuild failed: writes to region \(region) did not finish")
                state = .finished
                return .finished
            }
            state = .closing(region: region, waits: waits + 1)
            return .wait
        }
        let candidates = replicas.replicas.indices.filter {
            replicas.mode($0) == .rw && !failedSources.contains($0)
        }
        guard let source = candidates.first else {
            openRegion()
            let why = failedSources.isEmpty ? "no healthy replica to copy from" : "every source failed to copy region \(region)"
            failAll("rebuild failed: \(why)")
            state = .finished
            return .finished
        }
        state = .copying(region: region, source: source)
        return .copy(region: region, range: span(of: region), source: source, targets: targets)
    }

    /// A try failed: the source may have died. The region opens again (writes
    /// there wait no longer than one try) and is copied from another replica,
    /// each tried once.
    private func tryAnotherSource(_ region: Int, after source: Int, _ error: Error) {
        guard !shouldStop else {
            state = .finished
            return
        }
        logger.warning("rebuild of \(targets.map { "\(replicas.replicas[$0].address)" }.joined(separator: ", ")): copying region \(region) from replica \(source) failed (\(error)); trying another source")
        failedSources.insert(source)
        state = .opening(region: region)
    }

    /// The region's bytes, the last one clipped to the volume.
    private func span(of region: Int) -> ByteRange {
        let range = gate.range(of: region)
        return ByteRange(offset: range.offset, length: min(range.length, gate.size - range.offset))
    }

    private func failAll(_ reason: String) {
        for index in targets { replicas.fail(index, reason: reason) }
    }

    private func openRegion() {
        gate.unlockCopy()
        wakeWorkers()
    }
}
