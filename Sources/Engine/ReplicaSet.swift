import Logging
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// The volume's replicas and their modes, shared by all I/O threads and the
/// control plane.
///
/// Each replica's mode is an explicit state machine:
///
///     WO ──(rebuilt)──▶ RW ──(failed)──▶ ERR
///      └──────────(failed)─────────────▶ ERR        any ──(removed)──▶ removed
///
/// ERR and removed are final for that replica instance; a replacement joins
/// as a new WO replica. Replicas keep their index for the engine's life.
///
/// `generation` counts changes of the membership (the set of RW replicas);
/// the metadata keeper persists each generation on the replicas. While the
/// newest one is not persisted, write acknowledgements are held back: a write
/// must never be acknowledged while a replica that missed it could still be
/// taken for up to date after a crash.
public final class ReplicaSet: @unchecked Sendable {
    public enum Mode: String, Sendable {
        case rw = "RW"
        case wo = "WO"
        case err = "ERR"
        case removed = "REMOVED"

        /// Receives writes.
        public var isWritable: Bool { self == .rw || self == .wo }
    }

    public enum Health: String, Sendable {
        case healthy, degraded, faulted
    }

    public struct Replica: Sendable {
        public var address: SocketAddress
        public var controlAddress: SocketAddress
        public var id: String
        public var mode: Mode
        public var reason = ""
        /// While WO: how much of the volume has been copied to it.
        public var rebuiltBytes: UInt64 = 0

        public init(address: SocketAddress, controlAddress: SocketAddress, id: String, mode: Mode) {
            self.address = address
            self.controlAddress = controlAddress
            self.id = id
            self.mode = mode
        }
    }

    /// The most replicas a volume can have over an engine's life (indexes are never reused).
    public static let capacity = 32

    private let state: Mutex<[Replica]>
    /// Bumped on every change, so that I/O threads refresh their copy only then.
    let version = Atomic<UInt64>(0)
    private let generationCounter = Atomic<UInt64>(1)
    private let persistedGeneration = Atomic<UInt64>(0)
    /// RW replicas, kept with every change of the membership (read on every write's answer).
    private let healthyCount: Atomic<Int>
    private let logger: Logger
    /// Called after every change (outside the lock): wakes the keeper and the I/O threads.
    var onChange: @Sendable () -> Void = {}

    public init(_ replicas: [Replica], logger: Logger) {
        precondition(replicas.count <= Self.capacity)
        state = Mutex(replicas)
        healthyCount = Atomic(replicas.filter { $0.mode == .rw }.count)
        self.logger = logger
    }

    public var replicas: [Replica] { state.withLock { $0 } }

    public func mode(_ index: Int) -> Mode { state.withLock { $0[index].mode } }

    public var health: Health {
        if isFenced { return .faulted }
        let modes = replicas.map(\.mode).filter { $0 != .removed }
        let healthy = modes.filter { $0 == .rw }.count
        return healthy == modes.count ? .healthy : healthy == 0 ? .faulted : .degraded
    }

    // MARK: - Membership generations

    public var generation: UInt64 { generationCounter.load(ordering: .acquiring) }

    /// The identities of the RW replicas, with the generation they form.
    var membership: (generation: UInt64, members: [String]) {
        state.withLock { replicas in
            (generationCounter.load(ordering: .acquiring), replicas.filter { $0.mode == .rw }.map(\.id))
        }
    }

    /// Whether acknowledgements must wait for the newest membership to be persisted.
    public var holdsAcknowledgements: Bool {
        !isFenced && generationCounter.load(ordering: .acquiring) != persistedGeneration.load(ordering: .acquiring)
    }

    /// Polls until the newest membership is recorded (the metadata keeper
    /// does it); false when `seconds` pass first.
    public func waitUntilMembershipRecorded(seconds: Double) -> Bool {
        for _ in 0..<max(Int(seconds * 1000), 1) {
            guard holdsAcknowledgements else { return true }
            usleep(1000)
        }
        return !holdsAcknowledgements
    }

    // MARK: - Fencing

    private let fenced = Atomic<Bool>(false)

    /// A newer engine has claimed the replicas: this one may change nothing
    /// any more, not even the membership, and answers every request EIO.
    public var isFenced: Bool { fenced.load(ordering: .acquiring) }

    /// A replica refused a request for an older epoch (ESHUTDOWN). The replica
    /// is not failed: it is healthy, only no longer ours, and recording a
    /// membership without it would cost the new engine a full rebuild of it.
    public func fence(by index: Int) {
        guard !fenced.exchange(true, ordering: .acquiringAndReleasing) else { return }
        let address = state.withLock { $0[index].address }
        logger.error("fenced: replica \(address) belongs to a newer engine; every request now fails with EIO (stop this engine)")
        changed()
    }

    func persisted(generation: UInt64) {
        persistedGeneration.store(generation, ordering: .releasing)
        onChange()
    }

    // MARK: - Transitions

    /// Marks a replica failed (once) and says what that means for the volume.
    public func fail(_ index: Int, reason: String) {
        let outcome: (changed: Bool, healthy: Int, total: Int, address: SocketAddress) = state.withLock { replicas in
            let address = replicas[index].address
            guard replicas[index].mode.isWritable else { return (false, 0, 0, address) }
            if replicas[index].mode == .rw { leftMembership() }
            replicas[index].mode = .err
            replicas[index].reason = reason
            let live = replicas.filter { $0.mode != .removed }
            return (true, live.filter { $0.mode == .rw }.count, live.count, address)
        }
        guard outcome.changed else { return }
        changed()
        let volume = outcome.healthy == 0 ? "faulted: no healthy replica, I/O fails with EIO"
                                          : "degraded: \(outcome.healthy) of \(outcome.total) replicas healthy"
        logger.error("replica \(outcome.address) failed (\(reason)); volume \(volume)")
    }

    /// A new replica in WO mode; returns its index. A failed replica at the
    /// same address is replaced: it leaves the set.
    public func add(address: SocketAddress, controlAddress: SocketAddress, id: String) throws -> Int {
        let index: Int = try state.withLock { replicas in
            if let same = replicas.firstIndex(where: { $0.id == id && $0.mode.isWritable }) {
                throw EngineError("replica \(replicas[same].address) with this identity is already in the volume")
            }
            guard replicas.count < Self.capacity else {
                throw EngineError("this engine has taken \(Self.capacity) replicas over its life; restart it to add more")
            }
            for i in replicas.indices where replicas[i].address == address && replicas[i].mode == .err {
                replicas[i].mode = .removed
                replicas[i].reason = "replaced"
            }
            replicas.append(Replica(address: address, controlAddress: controlAddress, id: id, mode: .wo))
            return replicas.count - 1
        }
        changed()
        return index
    }

    func rebuilt(_ index: Int, bytes: UInt64) {
        state.withLock { $0[index].rebuiltBytes = bytes }
    }

    /// A write at `offset` goes to the replica: every write to an RW one; to
    /// a WO one only where its rebuild has copied already. Ahead of the copy
    /// the write is copied with its region, which is copied only once no
    /// write is in flight there, from a replica that took them all
    /// (`RebuildCycle` moves the mark before it opens the region again).
    public func takesWrite(_ index: Int, at offset: UInt64) -> Bool {
        state.withLock { replicas in
            switch replicas[index].mode {
            case .rw: return true
            case .wo: return offset < replicas[index].rebuiltBytes
            case .err, .removed: return false
            }
        }
    }

    /// WO → RW, when the rebuild has copied everything.
    func promote(_ index: Int) -> Bool {
        let done: Bool = state.withLock { replicas in
            guard replicas[index].mode == .wo else { return false }
            replicas[index].mode = .rw
            healthyCount.add(1, ordering: .sequentiallyConsistent)
            generationCounter.add(1, ordering: .sequentiallyConsistent)
            return true
        }
        if done { changed() }
        return done
    }

    /// Takes a replica out for good; refused for the last RW replica.
    func remove(address: SocketAddress) throws -> Int {
        let index: Int = try state.withLock { replicas in
            guard let index = replicas.lastIndex(where: { $0.address == address && $0.mode != .removed }) else {
                throw EngineError("\(address) is not a replica of this volume")
            }
            if replicas[index].mode == .rw && replicas.filter({ $0.mode == .rw }).count == 1 {
                throw EngineError("\(address) is the volume's last healthy replica; add another one first")
            }
            if replicas[index].mode == .rw { leftMembership() }
            replicas[index].mode = .removed
            replicas[index].reason = "removed"
            return index
        }
        changed()
        logger.notice("replica \(address) removed")
        return index
    }

    /// Under the state lock: an RW replica leaves the membership.
    private func leftMembership() {
        healthyCount.subtract(1, ordering: .sequentiallyConsistent)
        generationCounter.add(1, ordering: .sequentiallyConsistent)
    }

    /// Some replica is RW: an answer can rest on it.
    public var hasHealthyReplica: Bool { healthyCount.load(ordering: .acquiring) > 0 }

    private func changed() {
        version.add(1, ordering: .releasing)
        onChange()
    }
}

/// A control-plane request the engine refuses, with the reason.
public struct EngineError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
