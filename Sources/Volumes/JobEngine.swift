import ControlAPI
import Daemons
import Foundation
import NodeRegistry
import Syscalls

/// The engine a job (a backup, a restore) needs on a volume of this node. A
/// detached volume's engine is started for the job with no device frontend;
/// `keel volume attach` meanwhile takes it over (attach starts only the
/// frontend when the engine runs), so the workload never waits for the job.
/// At the end the job stops the engine only if it started it and nobody has
/// attached since.
public final class JobEngine {
    public let node: Node
    public let volume: VolumeRecord
    /// The engine's control address.
    public let control: String
    /// The job started the engine (the volume was detached).
    public let startedForJob: Bool
    private var released = false

    /// The running engine, or one started now and serving within `timeout` seconds.
    public init(node: Node, volume name: String, timeout: Double) throws {
        self.node = node
        let held = try node.lock(name)
        defer { held.unlock() }
        volume = try node.volume(name)
        control = node.engineControl(name)
        let attachment = node.attachment(volume)
        if attachment.engineRunning {
            startedForJob = false
            return
        }
        if volume.enginePlacedElsewhere {
            throw KeelError("volume \(name) runs its engine on engine nodes (\(volume.engineNodes.joined(separator: ", "))); "
                + "attach it, or pass --engine with its engine's control address")
        }
        if attachment.frontendRunning {
            throw KeelError("volume \(name) is attached and its frontend is restarting its engine; try again in a moment")
        }
        try node.checkNoLiveEngine(volume)
        try node.startReplicas(volume)
        let runner = node.runner(volume.runner)
        let engine = node.engineDaemon(volume)
        do { try runner.start(engine) } catch {
            throw KeelError("cannot start the engine of \(name): \(runner.lastFailure(engine) ?? "\(error)")")
        }
        // As long as an attach waits, whatever the job's own deadline: the volume's lock is held meanwhile.
        let wait = min(timeout, 120)
        do { try node.waitForEngine(of: name, engine, runner: runner, before: Date().addingTimeInterval(wait), timeout: wait) } catch {
            try? runner.stop(engine)
            throw error
        }
        startedForJob = true
    }

    /// Stops the engine if the job started it and the volume was not attached meanwhile; says what it did (nil: nothing).
    @discardableResult
    public func release() -> String? {
        guard startedForJob, !released else { return nil }
        released = true
        guard let held = try? node.lock(volume.name) else { return "could not take the volume's lock: its engine is left running" }
        defer { held.unlock() }
        if node.attachment(volume).frontendRunning { return "volume \(volume.name) was attached meanwhile: its engine stays" }
        do { try node.runner(volume.runner).stop(node.engineDaemon(volume)) } catch {
            return "cannot stop the engine of \(volume.name): \(error)"
        }
        return "engine of \(volume.name) stopped (started for this job: the volume was detached)"
    }
}

extension Node {
    /// Until the engine has claimed its replicas and serves (its control API answers).
    func waitForEngine(of name: String, _ engine: Daemon, runner: DaemonRunner, before deadline: Date, timeout: Double,
                       startedBy frontend: Daemon? = nil) throws {
        while Date() < deadline {
            let watched = frontend ?? engine
            guard runner.isRunning(watched) else {
                throw KeelError(runner.lastFailure(watched).map { "cannot start the engine of \(name): \($0)" }
                    ?? "the \(watched.description) stopped before the engine served; see its log")
            }
            if (try? callEngine(engineControl(name), doing: "report its status", { try await $0.status(.init()) })) != nil { return }
            usleep(100_000)
        }
        throw KeelError("the engine of \(name) did not serve within \(Int(timeout)) s; see its log")
    }

    /// A replica with open connections of its owner's epoch is in use by a live engine.
    func checkNoLiveEngine(_ volume: VolumeRecord) throws {
        for replica in volume.replicas {
            guard let address = try? Syscalls.SocketAddress(parsing: replica.address),
                  let status = try? replicaStatus(defaultControlAddress(forData: address)),
                  status.engineConnections > 0 else { continue }
            throw KeelError("volume \(volume.name) is attached elsewhere: engine \(status.owner.engine) (epoch \(status.owner.epoch)) "
                + "is connected to replica \(replica.address); detach it there first, or pass --force to take it over")
        }
    }
}
