import ControlAPI
import Daemons
import Foundation
import NodeRegistry

/// A migration's engine B of a volume systemd runs: the engine unit the
/// volume does not use now (`keel-engine@` and `keel-engine-alt@` take turns:
/// one unit cannot run twice), standing by on sockets of its own. Activated,
/// its sockets take the engine's names, its unit's next start runs it as the
/// engine, and the registry names it the volume's engine unit.
struct SystemdStandbyEngine: LocalStandby {
    let node: Node
    /// As it was with engine A serving.
    let volume: VolumeRecord

    private var runner: SystemdRunner { SystemdRunner(stateDirectory: node.layout.stateDirectory) }
    private var unit: VolumeRecord.EngineUnit { volume.engineUnit.other }
    /// Its unit, as the volume's engine runs it.
    private var serving: Daemon {
        var engine = volume
        engine.engineUnit = unit
        return node.engineDaemon(engine)
    }
    private var token: String { unit == .alternate ? "alt" : "first" }
    private var socket: String { node.layout.standbyEngineSocket(volume.name, token: token) }
    private var control: String { "unix:" + node.layout.standbyEngineControl(volume.name, token: token) }

    var endpoint: String { "unix:" + node.layout.engineSocket(volume.name) }
    var pid: pid_t { runner.mainPid(serving) ?? 0 }

    /// Starts it from `executable` (the unit's ExecStart replaced); systemd has it once it stands by.
    static func start(node: Node, volume: VolumeRecord, executable: String) throws -> SystemdStandbyEngine {
        let engine = SystemdStandbyEngine(node: node, volume: volume)
        var daemon = engine.serving
        for (option, value) in [("--listen", "unix:" + engine.socket), ("--control", engine.control)] {
            if let i = daemon.arguments.firstIndex(of: option) { daemon.arguments[i + 1] = value }
        }
        daemon.arguments.append("--standby")
        daemon.executable = executable
        do { try engine.runner.start(daemon) } catch {
            let reason = engine.runner.lastFailure(daemon) ?? "\(error)"
            engine.stop()
            throw KeelError("cannot start the new engine of \(volume.name) (\(daemon.unit)): \(reason)")
        }
        return engine
    }

    func waitUntilStandingBy(timeout: Double) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if (try? standbyState(control))?.standby == true { return }
            guard runner.isRunning(serving) else {
                throw KeelError("the new engine of \(volume.name) stopped before standing by: "
                    + (runner.lastFailure(serving) ?? "see 'journalctl -u \(serving.unit)'"))
            }
            usleep(100_000)
        }
        throw KeelError("the new engine of \(volume.name) did not stand by within \(Int(timeout)) s; see 'journalctl -u \(serving.unit)'")
    }

    func checkStandingBy() throws {
        guard runner.isRunning(serving) else { throw KeelError("its unit \(serving.unit) does not run") }
        try checkStandby(control)
    }

    func activate() throws -> Keel_Control_V1_Activated {
        let request = Keel_Control_V1_ActivateRequest.with {
            $0.listenPath = node.layout.engineSocket(volume.name)
            $0.controlPath = node.layout.engineControl(volume.name)
        }
        let activated = try callEngine(control, doing: "take the volume over") { try await $0.activate(request) }
        do {
            try runner.rewriteEnvironment(serving)
            try node.registry.setEngineUnit(unit, of: volume.name)
        } catch {
            throw EngineServesUnrecorded(volume: volume.name, error)
        }
        return activated
    }

    var runs: Bool { runner.isRunning(serving) }

    func stop() {
        try? runner.stop(serving)
        runner.forget(serving)
        unlink(socket)
        unlink(String(control.dropFirst("unix:".count)))
    }
}
