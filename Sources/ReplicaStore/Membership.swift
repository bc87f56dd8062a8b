/// Which replicas hold every acknowledged write of the volume, as of an
/// engine's epoch and the generation of its replica set within that epoch.
/// The newest record (by epoch, then generation) is the one to trust.
public struct Membership: Equatable, Sendable {
    public var epoch: UInt64
    public var generation: UInt64
    /// Replica identifiers.
    public var members: [String]

    public init(epoch: UInt64, generation: UInt64, members: [String]) {
        self.epoch = epoch
        self.generation = generation
        self.members = members
    }

    public func isNewer(than other: Membership?) -> Bool {
        guard let other else { return true }
        return (epoch, generation) > (other.epoch, other.generation)
    }
}
