import ReplicaIdentity
import ControlAPI
import Engine

/// The replicas' control API for one simulated engine: each call lands on the
/// simulated replica at once, checked against the owner as the replica's
/// store checks it, durable on return as SQLite makes it.
final class SimMetadata: ReplicaMetadata {
    private unowned let simulation: Simulation
    private unowned let engine: SimEngine
    /// The keeper's marks restart a region's idle clock; the rebuild's marks
    /// of regions already dirty (on the replica joining) do not.
    private let marksAreActivity: Bool

    init(simulation: Simulation, engine: SimEngine, marksAreActivity: Bool = true) {
        self.simulation = simulation
        self.engine = engine
        self.marksAreActivity = marksAreActivity
    }

    func run(_ call: MetadataCall, on indexes: [Int]) -> [Int: MetadataAnswer] {
        var answers: [Int: MetadataAnswer] = [:]
        for i in indexes {
            let replica = simulation.replicas[engine.replicaOf[i]]
            guard replica.running else {
                answers[i] = .failed("the replica is down")
                continue
            }
            guard replica.epoch == engine.epoch && replica.engine == engine.id else {
                answers[i] = .notOwner
                continue
            }
            switch call {
            case .markDirty(let spans):
                for region in spans.flatMap(simulation.regions(of:)) {
                    replica.dirty.insert(region)
                    if marksAreActivity { engine.lastActivity[region] = engine.tick }
                }
            case .clearDirty(let spans):
                for region in spans.flatMap(simulation.regions(of:)) {
                    let idle = engine.tick &- engine.lastActivity[region]
                    if idle < KeeperCycle.idleTicks {
                        simulation.violation("region \(region) cleared \(idle) tick(s) after its last write finished "
                                             + "(at least \(KeeperCycle.idleTicks))")
                    }
                }
                // As the replica does (ReplicaControlService.clearDirtyDurably): data durable first.
                replica.flush()
                for region in spans.flatMap(simulation.regions(of:)) { replica.dirty.remove(region) }
            case .setMembership(let generation, let members):
                if let current = replica.membership,
                   (current.epoch, current.generation) > (engine.epoch, generation) {
                    answers[i] = .failed("the replica holds a newer membership record")
                    continue
                }
                replica.membership = .with {
                    $0.epoch = engine.epoch
                    $0.generation = generation
                    $0.members = members
                }
            }
            answers[i] = .done
        }
        return answers
    }
}
