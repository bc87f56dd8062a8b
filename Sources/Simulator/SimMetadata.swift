import ReplicaIdentity
import ControlAPI
import Engine

/// The replicas' control API for one simulated engine: each call lands on the
/// simulated replica at once, checked against the owner as the replica's
/// store checks it, durable on return as SQLite makes it.
final class SimMetadata: ReplicaMetadata {
    private unowned let simulation: Simulation
    private unowned let engine: SimEngine

    init(simulation: Simulation, engine: SimEngine) {
        self.simulation = simulation
        self.engine = engine
    }

    func run(_ call: MetadataCall, on indexes: [Int]) -> [Int: MetadataAnswer] {
        var answers: [Int: MetadataAnswer] = [:]
        for i in indexes {
            let replica = simulation.replicas[i]
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
                for span in spans {
                    let region = simulation.region(of: span)
                    replica.dirty.insert(region)
                    engine.lastActivity[region] = engine.tick
                }
            case .clearDirty(let spans):
                for span in spans {
                    let region = simulation.region(of: span)
                    let idle = engine.tick &- engine.lastActivity[region]
                    if idle < KeeperCycle.idleTicks {
                        simulation.violation("region \(region) cleared \(idle) tick(s) after its last write finished "
                                             + "(at least \(KeeperCycle.idleTicks))")
                    }
                }
                // As the replica does (ReplicaControlService.clearDirtyDurably): data durable first.
                replica.flush()
                for span in spans { replica.dirty.remove(simulation.region(of: span)) }
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
