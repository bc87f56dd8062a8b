import ControlAPI
import GRPCCore
import Logging
import ReplicaStore

/// The replica's side of the control API: identity, dirty regions and
/// membership, each change allowed only to the engine that owns the replica
/// (checked by the store under the lock its claims take).
public struct ReplicaControlService: Keel_Control_V1_ReplicaControl.SimpleServiceProtocol {
    let store: ReplicaStore
    let sessions: EngineSessions
    let logger: Logger

    public init(store: ReplicaStore, sessions: EngineSessions, logger: Logger) {
        self.store = store
        self.sessions = sessions
        self.logger = logger
    }

    public func status(request: Keel_Control_V1_ReplicaStatusRequest,
                       context: ServerContext) async throws -> Keel_Control_V1_ReplicaStatus {
        let owner = store.owner
        var status = Keel_Control_V1_ReplicaStatus()
        status.id = store.id
        status.size = store.size
        status.owner = .with { $0.epoch = owner.epoch; $0.engine = owner.engine }
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
        return status
    }

    public func markDirty(request: Keel_Control_V1_DirtyRanges, context: ServerContext) async throws -> Keel_Control_V1_Done {
        try storeCall { try store.markDirty(request.ranges.map(Self.range), owner: Self.owner(request.owner)) }
        return .init()
    }

    public func clearDirty(request: Keel_Control_V1_DirtyRanges, context: ServerContext) async throws -> Keel_Control_V1_Done {
        try storeCall { try store.clearDirty(request.ranges.map(Self.range), owner: Self.owner(request.owner)) }
        return .init()
    }

    public func setMembership(request: Keel_Control_V1_MembershipUpdate,
                              context: ServerContext) async throws -> Keel_Control_V1_Done {
        let membership = Membership(epoch: request.membership.epoch, generation: request.membership.generation,
                                    members: request.membership.members)
        try storeCall { try store.setMembership(membership, owner: Self.owner(request.owner)) }
        logger.info("membership \(membership.epoch).\(membership.generation): \(membership.members.joined(separator: ", "))")
        return .init()
    }

    private static func range(_ range: Keel_Control_V1_ByteRange) -> ByteRange {
        ByteRange(offset: range.offset, length: range.length)
    }

    private static func owner(_ owner: Keel_Control_V1_Owner) -> (epoch: UInt64, engine: String) {
        (owner.epoch, owner.engine)
    }

    private func storeCall<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let error as ReplicaStore.Failure {
            throw RPCError(code: .failedPrecondition, message: "\(error)")
        } catch {
            logger.error("replica metadata: \(error)")
            throw RPCError(code: .internalError, message: "replica metadata: \(error)")
        }
    }
}
