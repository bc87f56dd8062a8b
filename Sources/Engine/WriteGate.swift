import Synchronization
import Syscalls

/// Decides, per region of the volume, when a write may go to the replicas.
///
/// Two things hold a write back:
/// - the **write-intent log**: a region must be marked dirty on every replica
///   (durably) before the first write into it, so that after an engine crash
///   the replicas know which regions may differ. Each region's intent state:
///
///       clean ──(first write)──▶ marking ──(marked on all)──▶ dirty
///         ▲                                                    │
///         └──────(cleared on all)── clearing ◀──(idle)─────────┘
///
///   Writes go only to dirty regions; a write that meets clean, marking or
///   clearing waits and is retried when the keeper wakes the I/O threads.
/// - a **rebuild copy**: the region being copied to a new replica takes no
///   writes until the copy is done, so the copy never overwrites a newer write.
/// - an **overlapping write in flight**: two writes (or TRIM, WRITE_ZEROES)
///   that touch the same bytes never run at once, so every replica applies
///   them in the same order. Replicas run requests concurrently and two
///   client connections land on different I/O threads, so without this two
///   overlapping writes in flight could land in different orders on
///   different replicas, leaving them holding different data.
public final class WriteGate: @unchecked Sendable {
    enum Intent: UInt8 {
        case clean, marking, dirty, clearing
    }

    public let size: UInt64
    public let regionSize: UInt64
    public let regionCount: Int

    private struct State {
        var intent: [Intent]
        var inFlight: [UInt32]
        /// The keeper's tick of each region's last write: idle regions get cleared.
        var lastWrite: [UInt32]
        var tick: UInt32 = 0
        var toMark: [Int] = []
        var copying: Int?
        /// The byte ranges of the writes in flight (only searched where a region has some).
        var writes: [Range<UInt64>] = []
        /// A write waits for an overlapping one: its finish wakes the I/O threads.
        var overlapWaiting = false
        /// No write is admitted (a snapshot is being taken).
        var paused = false
    }

    private let state: Mutex<State>
    /// Called when a region needs marking: wakes the keeper.
    var onMarkNeeded: @Sendable () -> Void = {}
    /// Called when a write that another one waited for has finished: wakes the I/O threads.
    var onOverlapCleared: @Sendable () -> Void = {}

    /// Regions of at least 1 MiB, and no more than 65536 of them.
    public init(size: UInt64, regionSize: UInt64? = nil) {
        var region: UInt64 = regionSize ?? 1 << 20
        while regionSize == nil && (size + region - 1) / region > 65536 { region <<= 1 }
        self.size = size
        self.regionSize = region
        regionCount = Int((size + region - 1) / region)
        var initial = State(intent: Array(repeating: .clean, count: regionCount),
                            inFlight: Array(repeating: 0, count: regionCount),
                            lastWrite: Array(repeating: 0, count: regionCount))
        // Room for every request slot of a busy engine: no allocation under the lock on the hot path.
        initial.writes.reserveCapacity(1024)
        state = Mutex(initial)
    }

    public func regions(offset: UInt64, length: UInt64) -> ClosedRange<Int> {
        let first = Int(offset / regionSize)
        let last = Int((offset + max(length, 1) - 1) / regionSize)
        return first...min(last, regionCount - 1)
    }

    public func range(of region: Int) -> (offset: UInt64, length: UInt64) {
        (UInt64(region) * regionSize, regionSize)
    }

    // MARK: - I/O threads

    /// Admits a write (counting it in flight) or says it must wait.
    public func admit(offset: UInt64, length: UInt64) -> Bool {
        let span = regions(offset: offset, length: length)
        let bytes = offset..<offset + max(length, 1)
        let (admitted, needsMark): (Bool, Bool) = state.withLock { s in
            if s.paused { return (false, false) }
            var ready = true, needsMark = false, busy = false
            for r in span {
                if s.copying == r { ready = false }
                if s.inFlight[r] > 0 { busy = true }
                switch s.intent[r] {
                case .dirty: continue
                case .clean:
                    s.intent[r] = .marking
                    s.toMark.append(r)
                    needsMark = true
                    ready = false
                case .marking, .clearing:
                    ready = false
                }
            }
            if ready && busy && s.writes.contains(where: { $0.overlaps(bytes) }) {
                s.overlapWaiting = true
                ready = false
            }
            guard ready else { return (false, needsMark) }
            // The idle clock is set when the write finishes: a region with writes in flight is never idle.
            for r in span { s.inFlight[r] += 1 }
            s.writes.append(bytes)
            return (true, false)
        }
        if needsMark { onMarkNeeded() }
        return admitted
    }

    /// The write has been answered by every replica.
    public func finish(offset: UInt64, length: UInt64) {
        let span = regions(offset: offset, length: length)
        let bytes = offset..<offset + max(length, 1)
        let wake: Bool = state.withLock { s in
            for r in span {
                precondition(s.inFlight[r] > 0, "a write finished in region \(r) with none in flight there")
                s.inFlight[r] -= 1
                // The idle clock starts when the region's last write is answered, not when it began.
                s.lastWrite[r] = s.tick
            }
            let index = s.writes.firstIndex(of: bytes)
            precondition(index != nil, "a write finished that was never admitted")
            s.writes.swapAt(index!, s.writes.count - 1)
            s.writes.removeLast()
            defer { s.overlapWaiting = false }
            return s.overlapWaiting
        }
        if wake { onOverlapCleared() }
    }

    /// Writes in flight (for tests and invariants).
    var writesInFlight: Int { state.withLock { $0.writes.count } }

    // MARK: - Keeper

    /// Regions waiting to be marked dirty on the replicas.
    func takeRegionsToMark() -> [Int] {
        state.withLock { s in
            defer { s.toMark.removeAll(keepingCapacity: true) }
            return s.toMark
        }
    }

    func marked(_ regions: [Int]) {
        state.withLock { s in
            // Freshly marked: not idle before the writes that asked for the mark arrive.
            for r in regions where s.intent[r] == .marking {
                s.intent[r] = .dirty
                s.lastWrite[r] = s.tick
            }
        }
    }

    /// Advances the idle clock; the keeper calls it about once a second.
    func tick() {
        state.withLock { $0.tick &+= 1 }
    }

    /// Dirty regions with no write in flight and none for `idleTicks`: they
    /// become `clearing` (writes to them wait) until `cleared`.
    func beginClearing(idleTicks: UInt32) -> [Int] {
        state.withLock { s in
            var regions: [Int] = []
            for r in 0..<regionCount
            where s.intent[r] == .dirty && s.inFlight[r] == 0 && s.tick &- s.lastWrite[r] >= idleTicks {
                s.intent[r] = .clearing
                regions.append(r)
            }
            return regions
        }
    }

    /// The clear is done (or abandoned: then the regions stay dirty).
    func cleared(_ regions: [Int], succeeded: Bool) {
        state.withLock { s in
            for r in regions where s.intent[r] == .clearing { s.intent[r] = succeeded ? .clean : .dirty }
        }
    }

    /// Regions that may differ between replicas if the engine crashed now.
    public func nonCleanRegions() -> [Int] {
        state.withLock { s in (0..<regionCount).filter { s.intent[$0] != .clean } }
    }

    /// Regions whose marking is done and whose clearing has not begun: every
    /// RW replica must hold their marks (the simulator checks it).
    public func markedRegions() -> [Int] {
        state.withLock { s in (0..<regionCount).filter { s.intent[$0] == .dirty } }
    }

    public var dirtyRegionCount: Int {
        state.withLock { s in s.intent.filter { $0 != .clean }.count }
    }

    // MARK: - Snapshots

    /// Admits no more writes; true once none is in flight. After `seconds`
    /// with some still in flight, false, and writes go on.
    func pauseWrites(seconds: Double) -> Bool {
        holdWrites()
        if pollUntil(seconds: seconds, { noWriteInFlight }) { return true }
        resumeWrites()
        return false
    }

    /// `pauseWrites` without the wait, for a caller that polls `noWriteInFlight` itself (the simulator).
    public func holdWrites() {
        state.withLock { $0.paused = true }
    }

    public var noWriteInFlight: Bool { state.withLock { $0.writes.isEmpty } }

    /// Writes held by `pauseWrites` are retried.
    public func resumeWrites() {
        state.withLock { $0.paused = false }
        onOverlapCleared()
    }

    // MARK: - Rebuild

    /// Closes a region to new writes; true once none is in flight there.
    func lockForCopy(_ region: Int) -> Bool {
        state.withLock { s in
            s.copying = region
            return s.inFlight[region] == 0
        }
    }

    func isQuiet(_ region: Int) -> Bool {
        state.withLock { $0.inFlight[region] == 0 }
    }

    func unlockCopy() {
        state.withLock { $0.copying = nil }
    }
}
