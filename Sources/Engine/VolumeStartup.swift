import ControlAPI
import GRPCCore
import LibNBD
import Logging
import ReplicaIdentity
import Syscalls

/// What an engine does before it serves: look at every replica (without
/// changing anything), decide which of them hold the volume's newest data,
/// claim them all with a new epoch, make the up-to-date ones identical again
/// where the previous engine may have left writes half done (the dirty
/// regions), and record the membership.
public struct VolumeStartup {
    public let volume: String
    /// The volume's identity, if it has one: a replica of another volume refuses the start.
    public let volumeID: String
    public let size: UInt64
    public let engineID: String
    public let replicaTimeoutSeconds: Double
    /// Serve without up-to-date replicas that cannot be reached (a majority must be there).
    public let allowDegraded: Bool
    public let logger: Logger

    public init(volume: String, volumeID: String = "", size: UInt64, engineID: String, replicaTimeoutSeconds: Double,
                allowDegraded: Bool = false, logger: Logger) {
        self.volume = volume
        self.volumeID = volumeID
        self.size = size
        self.engineID = engineID
        self.replicaTimeoutSeconds = replicaTimeoutSeconds
        self.allowDegraded = allowDegraded
        self.logger = logger
    }

    public struct Outcome {
        public var epoch: UInt64
        public var replicas: ReplicaSet
        public var resyncedBytes: UInt64
        public var resyncedRanges: Int
    }

    public func run(addresses: [SocketAddress], epoch requested: UInt64?) throws -> Outcome {
        let links = NetworkStartupLinks(addresses: addresses, startup: self)
        defer { links.close() }
        return try run(links, addresses: addresses, epoch: requested)
    }

    /// The start over any links; `addresses` name the replicas, in the links' order.
    public func run(_ links: some StartupLinks, addresses: [SocketAddress], epoch requested: UInt64?) throws -> Outcome {
        var unreachable: [String] = []
        let inspected = try addresses.indices.map { i -> Keel_Control_V1_ReplicaStatus? in
            do { return try links.inspect(i) } catch let error as StartupUnreachable {
                unreachable.append("\(addresses[i]): \(error.reason)")
                return nil
            }
        }
        guard inspected.contains(where: { $0 != nil }) else {
            throw EngineError("cannot reach any replica (\(unreachable.joined(separator: "; "))); nothing was changed")
        }
        // A first look decides nothing yet: it only refuses what cannot work
        // (and so fences nobody); the decision below uses what the replicas
        // say after the claim, when the old engine can change nothing more.
        _ = try decide(inspected, addressCount: addresses.count, unreachable: unreachable)
        let newest = inspected.compactMap { $0?.owner.epoch }.max()!
        guard newest < Owner.maximumEpoch else {
            throw EngineError("the replicas have seen the largest epoch there is (\(newest)); nothing was changed")
        }
        let epoch = requested ?? newest + 1
        guard epoch <= Owner.maximumEpoch else {
            throw EngineError("--epoch \(epoch) is larger than a replica can store (\(Owner.maximumEpoch)); nothing was changed")
        }
        guard epoch > newest else { throw EpochNotNewer(epoch: epoch, newest: newest) }

        let owner = Owner(epoch: epoch, engine: engineID)
        try links.claim(inspected.indices.filter { inspected[$0] != nil }, for: owner)
        let claimed = try inspected.indices.map { i in try inspected[i].map { _ in try links.status(i) } }
        let members = try decide(claimed, addressCount: addresses.count, unreachable: unreachable)

        let ordered = members.sorted()
        try reconcileChains(links, members: ordered, claimed: claimed, owner: owner, addresses: addresses)
        let dirty = Self.union(ordered.flatMap { claimed[$0]!.dirty }, size: size)
        var copied: UInt64 = 0
        if !dirty.isEmpty {
            if ordered.count > 1 {
                // Piece by piece, each with its own deadline: a merged range may be large.
                for range in dirty {
                    var offset = range.offset
                    while offset < range.offset + range.length {
                        let piece = ByteRange(offset: offset, length: min(Self.resyncPiece, range.offset + range.length - offset))
                        do { try links.copy(piece, from: ordered[0], to: Array(ordered.dropFirst())) } catch {
                            throw EngineError("cannot make the replicas identical at \(piece): \(error)")
                        }
                        offset = piece.end
                    }
                    copied += range.length
                }
                for i in ordered.dropFirst() { try links.flush(i) }
            }
            for i in ordered { try links.clearDirty(dirty, on: i, for: owner) }
            logger.notice("made the replicas identical: copied \(copied) of \(size) bytes, in \(dirty.count) dirty range(s)")
        }

        let replicas = ReplicaSet(claimed.enumerated().map { i, status in
            let address = addresses[i]
            var replica = ReplicaSet.Replica(address: address, controlAddress: defaultControlAddress(forData: address),
                                             id: status?.id ?? "", mode: members.contains(i) ? .rw : .err)
            if status == nil {
                replica.reason = "unreachable at start"
            } else if !members.contains(i) {
                replica.reason = "stale: it missed writes; rebuild it with keel replica add"
            }
            return replica
        }, logger: logger)
        let membership = Keel_Control_V1_Membership.with {
            $0.epoch = epoch
            $0.generation = replicas.generation
            $0.members = ordered.map { claimed[$0]!.id }
        }
        try links.setMembership(membership, on: claimed.indices.filter { claimed[$0] != nil }, for: owner)
        replicas.persisted(generation: replicas.generation)
        for line in unreachable { logger.warning("replica unreachable at start, left out: \(line)") }
        for i in claimed.indices where claimed[i] != nil && !members.contains(i) {
            logger.warning("replica \(addresses[i]) is stale: it missed writes; rebuild it with keel replica add")
        }
        return Outcome(epoch: epoch, replicas: replicas, resyncedBytes: copied, resyncedRanges: dirty.count)
    }

    /// Gives every member the same snapshots (`ChainReconciliation`): creates
    /// and removals stopped half way are undone and finished, before the
    /// resync writes anything into their heads.
    private func reconcileChains(_ links: some StartupLinks, members: [Int], claimed: [Keel_Control_V1_ReplicaStatus?],
                                 owner: Owner, addresses: [SocketAddress]) throws {
        let plan = ChainReconciliation.plan(Dictionary(uniqueKeysWithValues: members.map { i in
            let status = claimed[i]!
            return (i, ChainReconciliation.Chain(names: status.snapshots.map(\.name),
                                                 unsealed: Set(status.snapshots.filter(\.unsealed).map(\.name)),
                                                 removed: status.removedSnapshots))
        }))
        for (i, names) in plan.remove.sorted(by: { $0.key < $1.key }) {
            for name in names {
                do { try links.mergeSnapshot(i, name: name, for: owner) } catch {
                    throw EngineError("cannot remove snapshot \(name) from replica \(addresses[i]), "
                                      + "which an engine stopped creating or removing: \(error)")
                }
                logger.notice("replica \(addresses[i]) held snapshot \(name), which an engine stopped creating or removing: removed now")
            }
        }
        for i in plan.diverged {
            logger.error("replica \(addresses[i]) holds other snapshots than the rest of the volume: \(claimed[i]!.snapshots.map(\.name))")
        }
    }

    /// One region: the replica timeout bounds each piece, and on a slow host
    /// (TCG, a busy disk) 8 MiB to two targets took longer than the default.
    static let resyncPiece: UInt64 = 1 << 20

    // MARK: - Deciding

    /// The up-to-date replicas; refuses when replicas that may hold the newest
    /// data are missing (unreachable or not given) unless `allowDegraded`.
    private func decide(_ reports: [Keel_Control_V1_ReplicaStatus?], addressCount: Int,
                        unreachable: [String]) throws -> Set<Int> {
        let records = reports.map { $0.map { ($0.id, $0.hasMembership ? $0.membership : nil) } }
        let newest = Self.newest(records.compactMap { $0?.1 })
        let members = try Self.members(records, allowDegraded: allowDegraded)
        let expected = newest?.members.count ?? addressCount
        guard members.count >= expected || allowDegraded else {
            let why = unreachable.first.map { "cannot reach replica \($0)" }
                ?? "only \(members.count) of the \(expected) replicas that hold the volume's newest data are given"
            throw EngineError("\(why); nothing was changed (--allow-degraded starts without the others, losing writes only they have)")
        }
        return members
    }

    /// Which replicas hold every acknowledged write: those named by the newest
    /// membership record any of them has; with no record anywhere (a new
    /// volume), all of them. Unless `allowDegraded`, a majority of that
    /// record's members must be reachable: a lone replica with an old record
    /// cannot tell it is stale.
    public static func members(_ replicas: [(id: String, membership: Keel_Control_V1_Membership?)?],
                        allowDegraded: Bool = false) throws -> Set<Int> {
        let reachable = replicas.indices.filter { replicas[$0] != nil }
        guard let newest = newest(reachable.compactMap { replicas[$0]!.membership }) else {
            return Set(reachable)
        }
        let members = Set(reachable.filter { newest.members.contains(replicas[$0]!.id) })
        guard !members.isEmpty, members.count * 2 > newest.members.count || allowDegraded else {
            throw EngineError("""
                only \(members.count) of the \(newest.members.count) replica(s) that hold the volume's newest data \
                (membership \(newest.epoch).\(newest.generation)) are given and reachable; start the engine with more of them
                """)
        }
        return members
    }

    public static func newest(_ records: [Keel_Control_V1_Membership]) -> Keel_Control_V1_Membership? {
        records.max(by: { ($0.epoch, $0.generation) < ($1.epoch, $1.generation) })
    }

    /// Sorted, merged, clipped to the volume.
    public static func union(_ ranges: [Keel_Control_V1_ByteRange], size: UInt64) -> [Keel_Control_V1_ByteRange] {
        var merged: [Keel_Control_V1_ByteRange] = []
        for range in ranges.sorted(by: { $0.offset < $1.offset }) where range.offset < size {
            let end = min(range.offset + range.length, size)
            if let last = merged.last, range.offset <= last.offset + last.length {
                merged[merged.count - 1].length = max(last.length, end - last.offset)
            } else {
                merged.append(.with { $0.offset = range.offset; $0.length = end - range.offset })
            }
        }
        return merged
    }

    /// The claim a replica lists, once it is known to be a replica this volume may have.
    static func checkListing(_ exports: [String], of address: SocketAddress,
                             for volume: VolumeIdentity) throws -> ReplicaExportName {
        guard exports.count == 1, let listed = ReplicaExportName(parsing: exports[0]) else {
            throw EngineError("\(address) is not a Keel replica (it lists exports \(exports))")
        }
        if let refusal = listed.volume.refusal(of: volume) {
            throw EngineError("replica \(address): \(refusal)")
        }
        return listed
    }

    var identity: VolumeIdentity { VolumeIdentity(name: volume, id: volumeID) }
}
