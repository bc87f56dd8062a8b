import ControlAPI
import ReplicaIdentity

/// The replicas as `VolumeStartup` sees them, by index: in production NBD
/// and gRPC (`NetworkStartupLinks`), in the simulator replicas in memory.
/// A failed call throws, with the reason.
public protocol StartupLinks: AnyObject {
    /// Looks at a replica without changing anything: checks it is a replica
    /// this volume may have, of its size. Throws `StartupUnreachable` when
    /// nothing answers.
    func inspect(_ replica: Int) throws -> Keel_Control_V1_ReplicaStatus
    /// Opens the replica with `owner`'s claim: older engines are fenced from here on.
    func claim(_ replica: Int, for owner: Owner) throws
    func status(_ replica: Int) throws -> Keel_Control_V1_ReplicaStatus
    /// Copies `range` from one claimed replica to others.
    func copy(_ range: ByteRange, from source: Int, to targets: [Int]) throws
    func flush(_ replica: Int) throws
    func clearDirty(_ ranges: [Keel_Control_V1_ByteRange], on replica: Int, for owner: Owner) throws
    func setMembership(_ membership: Keel_Control_V1_Membership, on replica: Int, for owner: Owner) throws
    /// Merges snapshot `name` away on the replica (`ChainReconciliation`).
    func mergeSnapshot(_ replica: Int, name: String, for owner: Owner) throws
    /// `claim` of each, at once where the links can (each claim waits for a replica's disk).
    func claim(_ replicas: [Int], for owner: Owner) throws
    /// `setMembership` on each, at once where the links can.
    func setMembership(_ membership: Keel_Control_V1_Membership, on replicas: [Int], for owner: Owner) throws
}

extension StartupLinks {
    public func claim(_ replicas: [Int], for owner: Owner) throws {
        for i in replicas { try claim(i, for: owner) }
    }

    public func setMembership(_ membership: Keel_Control_V1_Membership, on replicas: [Int], for owner: Owner) throws {
        for i in replicas { try setMembership(membership, on: i, for: owner) }
    }
}

/// The epoch asked for is not newer than one a replica has seen: nothing was claimed.
public struct EpochNotNewer: Error, CustomStringConvertible {
    public let epoch: UInt64
    public let newest: UInt64

    public var description: String {
        "--epoch \(epoch) is not newer than epoch \(newest), which a replica has seen; nothing was changed"
    }
}

/// Nothing answers at the replica's address: the start may go on without it.
public struct StartupUnreachable: Error {
    public let reason: String
    public init(reason: String) { self.reason = reason }
}
