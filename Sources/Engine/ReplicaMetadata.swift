/// What the keeper asks of one replica's control API.
public enum MetadataCall: Sendable {
    case markDirty([ByteSpan])
    case clearDirty([ByteSpan])
    case setMembership(generation: UInt64, members: [String])
}

/// A replica's answer to a `MetadataCall`.
public enum MetadataAnswer: Sendable, Equatable {
    case done
    /// The replica belongs to a newer engine: this one is fenced.
    case notOwner
    case failed(String)
}

/// Bytes of the volume, as the keeper names them to replicas.
public struct ByteSpan: Sendable, Hashable {
    public var offset: UInt64
    public var length: UInt64

    public init(offset: UInt64, length: UInt64) {
        self.offset = offset
        self.length = length
    }
}

/// The replicas' control API as the keeper sees it: in production gRPC
/// (`ControlAPIMetadata`), in the simulator replicas in memory.
public protocol ReplicaMetadata: AnyObject {
    /// Runs `call` on every replica of `indexes` at once; answers for each.
    func run(_ call: MetadataCall, on indexes: [Int]) -> [Int: MetadataAnswer]
}
