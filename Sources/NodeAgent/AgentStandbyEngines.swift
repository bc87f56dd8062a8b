import ControlAPI
import Daemons
import Foundation
import GRPCCore
import NodeRegistry
import Syscalls

/// A live migration's engine B on this node: a second engine daemon of the
/// volume (pid file and log beside the engine's), standing by with its
/// sessions to every replica open and claiming nothing until it is activated.
/// It listens on the port the engine would; its control API stands by on a
/// socket of its own, which takes the engine's name when it is activated.
extension NodeAgentService {
    static let standbyBeside = "next"

    public func startStandbyEngine(request: Keel_Control_V1_StartEngineRequest,
                                   context: ServerContext) async throws -> Keel_Control_V1_StartedEngine {
        try Self.validate(request)
        let runner = try standbyRunner()
        let engine = engineDaemon(request)
        try await offThePool {
            guard !runner.isRunning(engine) else {
                throw RPCError(code: .failedPrecondition,
                               message: "the engine of \(request.volume) runs on \(settings.name): engine B goes on another node")
            }
            guard runner.runningPid(engine, beside: Self.standbyBeside) == nil else {
                throw RPCError(code: .alreadyExists, message: "an engine of \(request.volume) stands by on \(settings.name) already")
            }
        }
        let token = String(UInt32.random(in: 0x100000...0xFFFFFF), radix: 16)
        var arguments = engine.arguments
        if let i = arguments.firstIndex(of: "--control") {
            arguments[i + 1] = "unix:" + settings.layout.standbyEngineControl(request.volume, token: token)
        }
        let standby = Daemon(kind: .engine, instance: request.volume, arguments: arguments + ["--standby"])
        let pid = try await offThePool {
            do { return try runner.startBeside(standby, executable: runner.executable, beside: Self.standbyBeside) } catch {
                throw RPCError(code: .failedPrecondition, message: "cannot start engine B of \(request.volume) on \(settings.name): \(error)")
            }
        }
        do { try await waitUntilStandingBy(engine, pid: pid, runner: runner) } catch {
            _ = try? await offThePool { runner.stopBeside(engine, beside: Self.standbyBeside) }
            throw error
        }
        return .with { $0.address = address(port: request.port) }
    }

    public func standbyEngineState(request: Keel_Control_V1_StopEngineRequest,
                                   context: ServerContext) async throws -> Keel_Control_V1_EngineAlive {
        let control = try await standbyControl(request.volume)
        return try await callStandby(control, doing: "say whether it stands by") { try await $0.alive(.init()) }
    }

    public func activateStandbyEngine(request: Keel_Control_V1_StopEngineRequest,
                                      context: ServerContext) async throws -> Keel_Control_V1_Activated {
        let control = try await standbyControl(request.volume)
        let runner = try standbyRunner()
        let engine = Daemon(kind: .engine, instance: request.volume, arguments: [])
        let activation = Keel_Control_V1_ActivateRequest.with { $0.controlPath = settings.layout.engineControl(request.volume) }
        let activated = try await callStandby(control, doing: "take the volume over") { try await $0.activate(activation) }
        try await offThePool {
            do { try runner.promote(engine, beside: Self.standbyBeside) } catch {
                throw RPCError(code: .internalError, message: "engine B serves \(request.volume) on \(settings.name) but cannot be recorded as its engine: \(error)")
            }
        }
        return activated
    }

    public func stopStandbyEngine(request: Keel_Control_V1_StopEngineRequest,
                                  context: ServerContext) async throws -> Keel_Control_V1_NodeHealth {
        let control = try? await standbyControl(request.volume)
        let runner = try standbyRunner()
        try await offThePool {
            runner.stopBeside(Daemon(kind: .engine, instance: request.volume, arguments: []), beside: Self.standbyBeside)
            if let control { unlink(control) }
        }
        return try await health(request: .init(), context: context)
    }

    // MARK: - Steps

    private func standbyRunner() throws -> ProcessRunner {
        guard let runner = runner as? ProcessRunner else {
            throw RPCError(code: .failedPrecondition, message: "node \(settings.name) runs its daemons under systemd, whose engine unit "
                + "cannot run twice: a migration's engine cannot stand by there, for now")
        }
        return runner
    }

    /// The control socket of the volume's standby engine here.
    private func standbyControl(_ volume: String) async throws -> String {
        if let problem = VolumeRecord.validate(name: volume) {
            throw RPCError(code: .invalidArgument, message: "volume: \(problem)")
        }
        let runner = try standbyRunner()
        let engine = Daemon(kind: .engine, instance: volume, arguments: [])
        guard let pid = try await offThePool({ runner.runningPid(engine, beside: Self.standbyBeside) }) else {
            throw RPCError(code: .notFound, message: "no engine of \(volume) stands by on \(settings.name)")
        }
        return String(ProcessRunner.option("--control", ofProcess: pid).dropFirst("unix:".count))
    }

    private func callStandby<T: Sendable>(_ control: String, doing what: String,
                                          _ body: (Keel_Control_V1_EngineControl.Client<ControlTransport>) async throws -> T) async throws -> T {
        do {
            return try await withControlClient(.unix(path: control)) { try await body(Keel_Control_V1_EngineControl.Client(wrapping: $0)) }
        } catch let error as RPCError {
            throw RPCError(code: error.code == .unavailable ? .unavailable : .aborted,
                           message: "engine B on \(settings.name) could not \(what): \(error.message)")
        }
    }

    /// Until engine B says it stands by (its sessions to every replica open), it stops, or the start timeout.
    private func waitUntilStandingBy(_ engine: Daemon, pid: pid_t, runner: ProcessRunner) async throws {
        let deadline = Date().addingTimeInterval(settings.startTimeout)
        var started = false
        while Date() < deadline {
            let running = try await offThePool { runner.runningPid(engine, beside: Self.standbyBeside) == pid }
            started = started || running
            guard running || (!started && kill(pid, 0) == 0) else {
                let reason = try await offThePool { runner.lastFailure(engine, beside: Self.standbyBeside) } ?? "it stopped without saying why"
                throw RPCError(code: .failedPrecondition, message: "engine B of \(engine.instance) on \(settings.name) stopped before standing by: \(reason)")
            }
            let control = ProcessRunner.option("--control", ofProcess: pid)
            if control.hasPrefix("unix:"), let alive = try? await withControlClient(.unix(path: String(control.dropFirst(5))), {
                try await Keel_Control_V1_EngineControl.Client(wrapping: $0).alive(.init())
            }), alive.standby { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw RPCError(code: .deadlineExceeded,
                       message: "engine B of \(engine.instance) on \(settings.name) did not stand by within \(Int(settings.startTimeout)) s")
    }
}
