import ControlAPI
import GRPCCore
import Logging
import ReplicaIdentity
import ReplicaStore

/// The replica's side of the control API: identity, dirty regions and
/// membership, each change allowed only to the engine that owns the replica
/// (checked by the store under the lock its claims take).
public struct ReplicaControlService: Keel_Control_V1_ReplicaControl.SimpleServiceProtocol {
    let store: ReplicaStore
    let sessions: EngineSessions
    /// Makes every write this replica has answered durable (its head's fdatasync).
    let flushData: @Sendable () throws -> Void
    let faults: ReplicaFaults
    /// The data path's epoch: a claim moves it on.
    let fence: EpochFence
    /// Snapshots are taken and listed on the chain; nil in tests of the records alone.
    let device: ReplicaDevice?
    let logger: Logger

    public init(device: ReplicaDevice, logger: Logger) {
        self.init(store: device.store, sessions: device.sessions, flushData: { try device.flush() },
                  faults: device.faults, fence: device.fence, device: device, logger: logger)
    }

    init(store: ReplicaStore, sessions: EngineSessions, flushData: @escaping @Sendable () throws -> Void,
         faults: ReplicaFaults = ReplicaFaults(), fence: EpochFence? = nil, device: ReplicaDevice? = nil, logger: Logger) {
        self.device = device
        self.fence = fence ?? EpochFence(epoch: store.epoch)
        self.store = store
        self.sessions = sessions
        self.flushData = flushData
        self.faults = faults
        self.logger = logger
    }

    public func status(request: Keel_Control_V1_ReplicaStatusRequest,
                       context: ServerContext) async throws -> Keel_Control_V1_ReplicaStatus {
        let owner = store.owner
        var status = Keel_Control_V1_ReplicaStatus()
        status.id = store.id
        status.size = store.size
        status.owner = owner.message
        status.engineConnections = UInt32(sessions.connections(epoch: owner.epoch))
        status.dirty = try storeCall { try store.dirtyRanges() }.map { range in
            .with { $0.offset = range.offset; $0.length = range.length }
        }
        if let membership = try storeCall({ try store.membership() }) {
            status.membership = .with {
                $0.epoch = membership.epoch
                $0.generation = membership.generation
                $0.members = membership.members
            }
        }
        if let device {
            status.snapshots = try storeCall { try device.snapshots() }.map(\.message)
            status.removedSnapshots = try storeCall { try store.removedSnapshots() }
        }
        return status
    }

    public func freezeHead(request: Keel_Control_V1_FreezeHeadRequest,
                           context: ServerContext) async throws -> Keel_Control_V1_Snapshots {
        guard let device else { throw RPCError(code: .unimplemented, message: "this replica takes no snapshots") }
        // Syncing and holding the data path block: off the cooperative pool.
        try await offThePool {
            try storeCall {
                if request.prepare {
                    try device.prepareFreeze(snapshotName: request.name, owner: Owner(request.owner))
                } else {
                    try device.switchHead(snapshotName: request.name, owner: Owner(request.owner))
                }
            }
        }
        if !request.prepare { logger.notice("snapshot \(request.name) taken") }
        return .init()
    }

    public func mergeSnapshot(request: Keel_Control_V1_MergeSnapshotRequest,
                              context: ServerContext) async throws -> Keel_Control_V1_Snapshots {
        guard let device else { throw RPCError(code: .unimplemented, message: "this replica takes no snapshots") }
        // Copying, syncing and holding the data path block: off the cooperative pool.
        try await offThePool {
            try storeCall { try device.mergeSnapshot(named: request.name, owner: Owner(request.owner), checkOnly: request.check) }
        }
        if !request.check { logger.notice("snapshot \(request.name) removed (merged into its child)") }
        return .with { $0.snapshots = (try? device.snapshots().map(\.message)) ?? [] }
    }

    public func revertToSnapshot(request: Keel_Control_V1_RevertToSnapshotRequest,
                                 context: ServerContext) async throws -> Keel_Control_V1_Snapshots {
        guard let device else { throw RPCError(code: .unimplemented, message: "this replica takes no snapshots") }
        try await offThePool {
            try storeCall {
                try device.revert(toSnapshot: request.name, discardNewer: request.discardNewer, owner: Owner(request.owner),
                                  checkOnly: request.check)
            }
        }
        if !request.check { logger.notice("reverted to snapshot \(request.name)") }
        return .with { $0.snapshots = (try? device.snapshots().map(\.message)) ?? [] }
    }

    public func claim(request: Keel_Control_V1_ClaimRequest, context: ServerContext) async throws -> Keel_Control_V1_Done {
        let owner = Owner(request.owner)
        guard !owner.engine.isEmpty, !request.volume.isEmpty else {
            throw RPCError(code: .invalidArgument, message: "a claim names its engine and volume")
        }
        guard owner.epoch <= Owner.maximumEpoch else {
            throw RPCError(code: .invalidArgument, message: "epoch \(owner.epoch) is larger than a replica can store")
        }
        // Persisting syncs SQLite: off the cooperative pool.
        try await offThePool {
            do {
                try ReplicaClaim(store: store, fence: fence, logger: logger)
                    .claim(owner, volume: VolumeIdentity(name: request.volume, id: request.volumeID))
            } catch let refusal as ReplicaClaim.Refusal {
                switch refusal {
                case .policy(let reason): throw RPCError(code: .failedPrecondition, message: reason)
                case .platform(let reason): throw RPCError(code: .unavailable, message: reason)
                }
            }
        }
        return .init()
    }

    public func markDirty(request: Keel_Control_V1_DirtyRanges, context: ServerContext) async throws -> Keel_Control_V1_Done {
        let ranges = try request.ranges.map(range)
        if faults.holdStoreOnMark != nil {
            try await offThePool { faults.holdStore(store, logger: logger) }
        }
        try storeCall { try store.markDirty(ranges, owner: Owner(request.owner)) }
        return .init()
    }

    public func clearDirty(request: Keel_Control_V1_DirtyRanges, context: ServerContext) async throws -> Keel_Control_V1_Done {
        let ranges = try request.ranges.map(range)
        // The flush blocks: off the cooperative pool, where other calls (marks) must go on.
        try await offThePool { try clearDirtyDurably(ranges, owner: Owner(request.owner)) }
        return .init()
    }

    /// A mark goes only once the data under it is durable here: after a power
    /// cut, replicas could otherwise differ inside a region marked clean, and
    /// no engine would ever make them identical again.
    func clearDirtyDurably(_ ranges: [ByteRange], owner: Owner) throws {
        do { try flushData() } catch {
            logger.error("cannot make the data durable before clearing dirty regions: \(error)")
            throw RPCError(code: .unavailable, message: "cannot make the data durable: \(error)")
        }
        try storeCall { try store.clearDirty(ranges, owner: owner) }
    }

    public func setMembership(request: Keel_Control_V1_MembershipUpdate,
                              context: ServerContext) async throws -> Keel_Control_V1_Done {
        let membership = Membership(epoch: request.membership.epoch, generation: request.membership.generation,
                                    members: request.membership.members)
        try storeCall { try store.setMembership(membership, owner: Owner(request.owner)) }
        logger.info("membership \(membership.epoch).\(membership.generation): \(membership.members.joined(separator: ", "))")
        return .init()
    }

    /// A range off the network: inside the volume, or an invalid-argument answer (never an overflow trap).
    private func range(_ range: Keel_Control_V1_ByteRange) throws -> ByteRange {
        let (end, overflow) = range.offset.addingReportingOverflow(range.length)
        guard !overflow, end <= store.size else {
            throw RPCError(code: .invalidArgument,
                           message: "range \(range.offset)+\(range.length) is outside the replica's \(store.size) bytes")
        }
        return ByteRange(offset: range.offset, length: range.length)
    }

    private func storeCall<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let error as ReplicaStore.Failure {
            // An engine told "not yours" knows it is fenced: it must not take the replica for failed.
            if case .notOwner = error { throw RPCError(code: .permissionDenied, message: "\(error)") }
            throw RPCError(code: .failedPrecondition, message: "\(error)")
        } catch let error as ReplicaStore.SnapshotFailure {
            if case .unknown = error { throw RPCError(code: .notFound, message: "\(error)") }
            throw RPCError(code: .failedPrecondition, message: "\(error)")
        } catch let error as ReplicaDevice.Unchanged {
            throw RPCError(code: .aborted, message: "\(error)")
        } catch let error as ReplicaDevice.SnapshotError {
            throw RPCError(code: .unavailable, message: "\(error)")
        } catch {
            logger.error("replica metadata: \(error)")
            throw RPCError(code: .internalError, message: "replica metadata: \(error)")
        }
    }
}

extension ReplicaDevice.Snapshot {
    var message: Keel_Control_V1_Snapshot {
        .with {
            $0.name = record.name
            $0.created = record.created
            $0.ownBytes = ownBytes
            $0.parent = record.parent ?? ""
            $0.layer = record.layer
            $0.unsealed = !record.sealed
        }
    }
}
