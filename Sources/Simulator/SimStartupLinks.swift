import ControlAPI
import Engine
import ReplicaIdentity

/// `StartupLinks` to the simulated replicas, answering as a replica's NBD
/// server and control API do (a claim older than the replica's epoch is
/// refused; records change only for their owner; a clear makes the data
/// durable first). With `failures`, a call fails now and then, as a replica
/// dying in the middle of a start would make it: the start stops half done.
final class SimStartupLinks: StartupLinks {
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    private unowned let simulation: Simulation
    private let failures: Bool
    /// A failure was injected: the start's error is expected.
    private(set) var failed = false

    init(simulation: Simulation, failures: Bool) {
        self.simulation = simulation
        self.failures = failures
    }

    private var regionBytes: UInt64 { UInt64(simulation.options.regionBlocks) * simulation.blockSize }

    private func replica(_ i: Int, _ call: String) throws -> SimReplica {
        let replica = simulation.replicas[i]
        guard replica.running else { throw StartupUnreachable(reason: "replica \(i) is down") }
        if failures && simulation.random.chance(perMille: 40) {
            failed = true
            simulation.trace?("startup: \(call) on replica \(i) fails")
            throw Failure(description: "injected: \(call) on replica \(i) failed")
        }
        return replica
    }

    private func owned(_ i: Int, by owner: Owner, _ call: String) throws -> SimReplica {
        let replica = try replica(i, call)
        guard replica.epoch == owner.epoch && replica.engine == owner.engine else {
            throw Failure(description: "\(call): replica \(i) belongs to epoch \(replica.epoch)")
        }
        return replica
    }

    func inspect(_ i: Int) throws -> Keel_Control_V1_ReplicaStatus {
        status(of: try replica(i, "inspect"))
    }

    func claim(_ i: Int, for owner: Owner) throws {
        let replica = try replica(i, "claim")
        guard owner.epoch >= replica.epoch else {
            throw Failure(description: "replica \(i) refused epoch \(owner.epoch): it has seen \(replica.epoch)")
        }
        replica.epoch = owner.epoch
        replica.engine = owner.engine
        replica.fence.advance(to: owner.epoch)
    }

    func status(_ i: Int) throws -> Keel_Control_V1_ReplicaStatus {
        status(of: try replica(i, "status"))
    }

    func copy(_ range: ByteRange, from source: Int, to targets: [Int]) throws {
        let from = try replica(source, "copy")
        let blocks = simulation.blocks(of: range)
        for t in targets { try replica(t, "copy").writeHead(blocks, from.volatile[blocks]) }
    }

    func flush(_ i: Int) throws {
        try replica(i, "flush").flush()
    }

    func clearDirty(_ ranges: [Keel_Control_V1_ByteRange], on i: Int, for owner: Owner) throws {
        let replica = try owned(i, by: owner, "clear")
        replica.flush()
        for range in ranges {
            for region in simulation.regions(of: ByteRange(offset: range.offset, length: range.length)) {
                replica.dirty.remove(region)
            }
        }
    }

    func setMembership(_ membership: Keel_Control_V1_Membership, on i: Int, for owner: Owner) throws {
        let replica = try owned(i, by: owner, "membership")
        if let current = replica.membership, (current.epoch, current.generation) > (membership.epoch, membership.generation) {
            throw Failure(description: "replica \(i) holds a newer membership record")
        }
        replica.membership = membership
    }

    func mergeSnapshot(_ i: Int, name: String, for owner: Owner) throws {
        try owned(i, by: owner, "merge").removeSnapshot(name)
    }

    private func status(of replica: SimReplica) -> Keel_Control_V1_ReplicaStatus {
        .with { status in
            status.id = replica.id
            status.size = simulation.volumeSize
            status.owner = Owner(epoch: replica.epoch, engine: replica.engine).message
            status.dirty = replica.dirty.sorted().map { region in
                .with { $0.offset = UInt64(region) * regionBytes; $0.length = regionBytes }
            }
            if let membership = replica.membership { status.membership = membership }
            // The replica's status waits for a seal under way.
            replica.seal()
            let unsealed = Set(replica.unsealedSnapshots)
            status.snapshots = replica.snapshotNames.map { name in .with { $0.name = name; $0.unsealed = unsealed.contains(name) } }
            status.removedSnapshots = replica.removedSnapshots
        }
    }
}
