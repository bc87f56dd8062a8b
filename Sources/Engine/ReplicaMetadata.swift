import ReplicaIdentity

/// What the keeper asks of one replica's control API.
public enum MetadataCall: Sendable {
    case markDirty([ByteRange])
    case clearDirty([ByteRange])
    case setMembership(generation: UInt64, members: [String])
}

/// A replica's answer to a `MetadataCall`.
public enum MetadataAnswer: Sendable, Equatable {
    case done
    /// The replica belongs to a newer engine: this one is fenced.
    case notOwner
    case failed(String)
}

/// The replicas' control API as the keeper sees it: in production gRPC
/// (`ControlAPIMetadata`), in the simulator replicas in memory.
public protocol ReplicaMetadata: AnyObject {
    /// Runs `call` on every replica of `indexes` at once; answers for each.
    func run(_ call: MetadataCall, on indexes: [Int]) -> [Int: MetadataAnswer]
}
