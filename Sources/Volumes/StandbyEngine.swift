import ControlAPI
import Daemons
import Foundation
import NodeRegistry
import Syscalls

/// A migration's engine B on this node: a second engine daemon of the volume
/// beside A (its own pid file and log), on sockets of its own while it stands
/// by, which take A's names when it takes A's place.
struct StandbyEngine {
    static let beside = "next"

    let node: Node
    let volume: VolumeRecord

    private var runner: ProcessRunner {
        ProcessRunner(runDirectory: node.layout.runDirectory, logDirectory: node.layout.logDirectory, executable: node.executable)
    }

    var control: String { "unix:" + node.layout.standbyEngineControl(volume.name) }

    /// A's daemon with B's sockets, standing by.
    private var daemon: Daemon {
        var arguments = node.engineDaemon(volume).arguments
        for (option, value) in [("--listen", "unix:" + node.layout.standbyEngineSocket(volume.name)), ("--control", control)] {
            if let i = arguments.firstIndex(of: option) { arguments[i + 1] = value }
        }
        return Daemon(kind: .engine, instance: volume.name, arguments: arguments + ["--standby"])
    }

    func spawn(executable: String) throws -> pid_t {
        do { return try runner.startBeside(daemon, executable: executable, beside: Self.beside) } catch {
            throw KeelError("cannot start engine B of \(volume.name): \(error)")
        }
    }

    /// Until B says it stands by (its sessions to every replica open), or fails.
    func waitUntilStandingBy(pid: pid_t, timeout: Double) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            guard runner.runningPid(daemon, beside: Self.beside) == pid else {
                throw KeelError("engine B of \(volume.name) stopped before standing by: "
                    + (runner.lastFailure(daemon, beside: Self.beside) ?? "see \(runner.logPath(daemon, beside: Self.beside))"))
            }
            if (try? alive())?.standby == true { return }
            usleep(100_000)
        }
        throw KeelError("engine B of \(volume.name) did not stand by within \(Int(timeout)) s; see \(runner.logPath(daemon, beside: Self.beside))")
    }

    func checkStandingBy() throws {
        guard runner.runningPid(daemon, beside: Self.beside) != nil else { throw KeelError("its process is gone") }
        guard try alive().standby else { throw KeelError("it is not standing by") }
    }

    private func alive() throws -> Keel_Control_V1_EngineAlive {
        try callEngine(control, doing: "say whether it stands by") { try await $0.alive(.init()) }
    }

    /// Stops B if it runs; nothing it had stays.
    func stop(pid: pid_t) {
        runner.stopBeside(daemon, beside: Self.beside)
        unlink(node.layout.standbyEngineSocket(volume.name))
        unlink(node.layout.standbyEngineControl(volume.name))
    }

    /// B, serving now, becomes the volume's engine daemon: A's socket names (clients and the
    /// device frontend connect by them), pid file and log.
    func takePlace(pid: pid_t, of engine: Daemon) throws {
        for (from, to) in [(node.layout.standbyEngineSocket(volume.name), node.layout.engineSocket(volume.name)),
                           (node.layout.standbyEngineControl(volume.name), node.layout.engineControl(volume.name))] {
            guard rename(from, to) == 0 else {
                throw KeelError("engine B serves \(volume.name) but its socket \(from) cannot take the name \(to): "
                    + String(cString: strerror(errno)))
            }
        }
        do { try runner.promote(engine, beside: Self.beside) } catch {
            throw KeelError("engine B serves \(volume.name) but cannot be recorded as its engine: \(error)")
        }
    }
}
