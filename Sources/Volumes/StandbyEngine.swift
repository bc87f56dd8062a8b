import ControlAPI
import Daemons
import Foundation
import NodeRegistry
import Syscalls

/// A migration's new engine on this node: a second engine daemon of the
/// volume beside the one serving (its own pid file and log), standing by on
/// sockets of its own, which take the serving engine's names when it takes
/// its place. Each gets new socket names: gRPC removes the path it bound when
/// it stops, which must not be the next standby engine's.
struct StandbyEngine {
    static let beside = "next"

    let node: Node
    let volume: VolumeRecord
    let pid: pid_t
    /// Its NBD socket and control API while it stands by (empty once its process is gone).
    let socket: String
    let control: String

    /// The standby engine `pid` of the volume, as its command line names its sockets.
    init(node: Node, volume: VolumeRecord, pid: pid_t) {
        self.node = node
        self.volume = volume
        self.pid = pid
        socket = String(ProcessRunner.option("--listen", ofProcess: pid).dropFirst("unix:".count))
        control = ProcessRunner.option("--control", ofProcess: pid)
    }

    /// Starts one from `executable`, standing by on sockets named for it alone.
    static func spawn(node: Node, volume: VolumeRecord, executable: String) throws -> StandbyEngine {
        let token = String(UInt32.random(in: 0x100000...0xFFFFFF), radix: 16)
        var arguments = node.engineDaemon(volume).arguments
        for (option, value) in [("--listen", "unix:" + node.layout.standbyEngineSocket(volume.name, token: token)),
                                ("--control", "unix:" + node.layout.standbyEngineControl(volume.name, token: token))] {
            if let i = arguments.firstIndex(of: option) { arguments[i + 1] = value }
        }
        let daemon = Daemon(kind: .engine, instance: volume.name, arguments: arguments + ["--standby"])
        let pid: pid_t
        do { pid = try runner(node).startBeside(daemon, executable: executable, beside: beside) } catch {
            throw KeelError("cannot start the new engine of \(volume.name): \(error)")
        }
        // Its command line may still be this process's for a moment: the paths are known here.
        return StandbyEngine(node: node, volume: volume, pid: pid, socket: node.layout.standbyEngineSocket(volume.name, token: token),
                             control: "unix:" + node.layout.standbyEngineControl(volume.name, token: token))
    }

    private init(node: Node, volume: VolumeRecord, pid: pid_t, socket: String, control: String) {
        self.node = node
        self.volume = volume
        self.pid = pid
        self.socket = socket
        self.control = control
    }

    private static func runner(_ node: Node) -> ProcessRunner {
        ProcessRunner(runDirectory: node.layout.runDirectory, logDirectory: node.layout.logDirectory, executable: node.executable)
    }

    private var runner: ProcessRunner { Self.runner(node) }
    private var daemon: Daemon { node.engineDaemon(volume) }
    private var log: String { runner.logPath(daemon, beside: Self.beside) }

    /// Until it says it stands by (its sessions to every replica open), or fails.
    func waitUntilStandingBy(timeout: Double) throws {
        let deadline = Date().addingTimeInterval(timeout)
        var started = false
        while Date() < deadline {
            // Until the new program's arguments show in /proc, the pid looks like nobody's.
            let running = runner.runningPid(daemon, beside: Self.beside) == pid
            started = started || running
            guard running || (!started && kill(pid, 0) == 0) else {
                throw KeelError("the new engine of \(volume.name) stopped before standing by: "
                    + (runner.lastFailure(daemon, beside: Self.beside) ?? "see \(log)"))
            }
            if (try? standbyState(control))?.standby == true { return }
            usleep(100_000)
        }
        throw KeelError("the new engine of \(volume.name) did not stand by within \(Int(timeout)) s; see \(log)")
    }

    func checkStandingBy() throws {
        guard !control.isEmpty, runner.runningPid(daemon, beside: Self.beside) == pid else { throw KeelError("its process is gone") }
        try checkStandby(control)
    }

    /// Stops it if it runs; nothing it had stays.
    func stop() {
        runner.stopBeside(daemon, beside: Self.beside)
        if !socket.isEmpty { unlink(socket) }
        if !control.isEmpty { unlink(String(control.dropFirst("unix:".count))) }
    }

    /// Activates it; once it serves, its sockets take the serving engine's names (clients
    /// and the device frontend connect by them). Returns what the activation answered.
    func activateHere() throws -> Keel_Control_V1_Activated {
        let request = Keel_Control_V1_ActivateRequest.with {
            $0.listenPath = node.layout.engineSocket(volume.name)
            $0.controlPath = node.layout.engineControl(volume.name)
        }
        return try callEngine(control, doing: "take the volume over") { try await $0.activate(request) }
    }

    /// Serving under the engine's socket names now, it becomes the volume's engine daemon: its pid file and log.
    func takePlace() throws {
        do { try runner.promote(daemon, beside: Self.beside) } catch {
            throw EngineServesUnrecorded(volume: volume.name, error)
        }
    }
}

/// A standby engine on this node, as the migration starts it.
protocol LocalStandby: MigrationEngineB {
    var pid: pid_t { get }
    func waitUntilStandingBy(timeout: Double) throws
}

extension StandbyEngine: LocalStandby {}

/// What the standby engine at `control` says of itself.
func standbyState(_ control: String) throws -> Keel_Control_V1_EngineAlive {
    try callEngine(control, doing: "say whether it stands by") { try await $0.alive(.init()) }
}

/// Refuses when the engine at `control` does not stand by with every session open.
func checkStandby(_ control: String) throws { try checkStandby(try standbyState(control)) }

/// Refuses when a standby engine that said `alive` does not stand by with every session open.
func checkStandby(_ alive: Keel_Control_V1_EngineAlive) throws {
    guard alive.standby else { throw KeelError("it is not standing by") }
    guard alive.standbyLost.isEmpty else {
        throw KeelError("it lost its sessions to replica(s) \(alive.standbyLost.joined(separator: ", ")) (restarted, or cut off); "
            + "switching to it would leave them out")
    }
}
