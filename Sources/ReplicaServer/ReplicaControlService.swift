import ControlAPI
import GRPCCore
import Logging
import ReplicaStore

/// The replica's side of the control API: identity, dirty regions and
/// membership, each change allowed only to the engine that owns the replica.
public struct ReplicaControlService: Keel_Control_V1_ReplicaControl.SimpleServiceProtocol {
    let store: ReplicaStore
    let logger: Logger

    public init(store: ReplicaStore, logger: Logger) {
        self.store = store
        self.logger = logger
    }

    public func status(request: Keel_Control_V1_ReplicaStatusRequest,
                       context: ServerContext) async throws -> Keel_Control_V1_ReplicaStatus {
        let owner = store.owner
        var status = Keel_Control_V1_ReplicaStatus()
        status.id = store.id
        status.size = store.size
        status.owner = .with { $0.epoch = owner.epoch; $0.engine = owner.engine }
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
        return status
    }

    public func markDirty(request: Keel_Control_V1_DirtyRanges, context: ServerContext) async throws -> Keel_Control_V1_Done {
        try checkOwner(request.owner)
        try storeCall { try store.markDirty(request.ranges.map(Self.range)) }
        return .init()
    }

    public func clearDirty(request: Keel_Control_V1_DirtyRanges, context: ServerContext) async throws -> Keel_Control_V1_Done {
        try checkOwner(request.owner)
        try storeCall { try store.clearDirty(request.ranges.map(Self.range)) }
        return .init()
    }

    public func setMembership(request: Keel_Control_V1_MembershipUpdate,
                              context: ServerContext) async throws -> Keel_Control_V1_Done {
        try checkOwner(request.owner)
        let membership = Membership(epoch: request.membership.epoch, generation: request.membership.generation,
                                    members: request.membership.members)
        try storeCall { try store.setMembership(membership) }
        logger.info("membership \(membership.epoch).\(membership.generation): \(membership.members.joined(separator: ", "))")
        return .init()
    }

    private static func range(_ range: Keel_Control_V1_ByteRange) -> ByteRange {
        ByteRange(offset: range.offset, length: range.length)
    }

    private func checkOwner(_ owner: Keel_Control_V1_Owner) throws {
        guard store.isOwned(by: owner.epoch, engine: owner.engine) else {
            let current = store.owner
            throw RPCError(code: .failedPrecondition, message: """
                epoch \(owner.epoch) of engine \(owner.engine) does not own this replica \
                (epoch \(current.epoch), engine \(current.engine))
                """)
        }
    }

    private func storeCall<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch {
            logger.error("replica metadata: \(error)")
            throw RPCError(code: .internalError, message: "replica metadata: \(error)")
        }
    }
}
