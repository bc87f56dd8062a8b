import ControlAPI
import Daemons
import DeviceFrontend
import Foundation
import GRPCCore
import Synchronization
import Syscalls

/// What an engine needs to start anywhere: the volume and its replicas.
public struct EngineSpec: Sendable {
    public var volume: String
    public var volumeID: String
    public var size: UInt64
    public var replicas: [String]
    /// The NBD port of an engine a node agent starts, on that node's address.
    public var port: UInt32
    public var replicaTimeout: Double

    public init(volume: String, volumeID: String, size: UInt64, replicas: [String], port: UInt32, replicaTimeout: Double) {
        self.volume = volume
        self.volumeID = volumeID
        self.size = size
        self.replicas = replicas
        self.port = port
        self.replicaTimeout = replicaTimeout
    }
}

extension EngineSpec {
    /// What a node agent is asked to start.
    var request: Keel_Control_V1_StartEngineRequest {
        .with {
            $0.volume = volume
            $0.volumeID = volumeID
            $0.size = size
            $0.replicas = replicas
            $0.port = port
            $0.replicaTimeout = replicaTimeout
        }
    }
}

/// An engine serving the volume after a start: where, and whether it had been running.
public struct StartedEngine: Sendable {
    public var endpoint: EngineEndpoint
    public var alreadyRunning: Bool
    public var detail: String
}

/// A place where the device frontend may have the volume's engine run: this
/// node's own daemons, or a node agent. Calls may take minutes (an engine
/// claims its replicas); `calls` lets the frontend cancel them when it stops.
public protocol EnginePlace: Sendable {
    /// For the log.
    var name: String { get }
    /// Whether an engine at `endpoint` is one this place ran.
    func ran(_ endpoint: EngineEndpoint) -> Bool
    /// False when the place does not answer at once: its node is down or cut off.
    func answers(_ calls: CancellableCalls) -> Bool
    /// Starts the engine here or finds it serving; a running one is killed and
    /// started again when `restartRunning` (its clients get no answer from it).
    func startEngine(_ spec: EngineSpec, restartRunning: Bool, _ calls: CancellableCalls) throws -> StartedEngine
}

/// The calls a frontend has under way, so that stopping it ends them.
public final class CancellableCalls: Sendable {
    private let state = Mutex<(cancelled: Bool, current: Task<Void, Never>?)>((false, nil))

    public init() {}

    public func cancel() {
        state.withLock { state in
            state.cancelled = true
            state.current?.cancel()
        }
    }

    public var isCancelled: Bool { state.withLock { $0.cancelled } }

    /// Runs `body`, handing it the hook through which the call's task is registered for cancellation.
    public func run<T>(_ body: ((Task<Void, Never>) -> Void) throws -> T) rethrows -> T {
        defer { state.withLock { $0.current = nil } }
        return try body { task in
            state.withLock { state in
                state.current = task
                if state.cancelled { task.cancel() }
            }
        }
    }
}

/// A node whose agent (`keel node serve`) starts the engine there.
public struct AgentPlace: EnginePlace {
    /// The agent's HOST:PORT.
    public let address: String

    public init(address: String) { self.address = address }
    public var name: String { "node \(address)" }

    public func ran(_ endpoint: EngineEndpoint) -> Bool {
        guard case .tcp(let host, _) = endpoint.address else { return false }
        return hosts(host)
    }

    /// Whether `host` is this node's address (its engines listen on the agent's host).
    func hosts(_ host: String) -> Bool {
        guard case .tcp(let agentHost, _)? = try? Syscalls.SocketAddress(parsing: address) else { return false }
        return host == agentHost
    }

    public func answers(_ calls: CancellableCalls) -> Bool {
        (try? calls.run { started in
            try callNode(address, doing: "report its health", started: started) {
                try await $0.health(.init(), options: .timeout(seconds: 3))
            }
        }) != nil
    }

    public func startEngine(_ spec: EngineSpec, restartRunning: Bool, _ calls: CancellableCalls) throws -> StartedEngine {
        var request = spec.request
        request.restartRunning = restartRunning
        let started = try calls.run { hook in
            try callNode(address, doing: "start the engine of \(spec.volume)", started: hook) {
                try await $0.startEngine(request, options: .timeout(seconds: 150))
            }
        }
        let endpoint = EngineEndpoint(address: try Syscalls.SocketAddress(parsing: started.address), exportName: spec.volume)
        return StartedEngine(endpoint: endpoint, alreadyRunning: started.alreadyRunning, detail: "epoch \(started.epoch)")
    }
}

/// This node's own engine daemon of the volume (a systemd unit or a process
/// of keel's own), which nothing but the frontend restarts.
public struct LocalPlace: EnginePlace {
    public let runner: any DaemonRunner & Sendable
    /// The volume's engine daemon, looked up at each use: a migration under systemd changes its unit.
    private let currentEngine: @Sendable () -> Daemon
    public var engine: Daemon { currentEngine() }
    /// The engine's NBD socket and control API.
    public let socket: String
    public let control: String
    /// Seconds a start may take (claiming replicas).
    public var startTimeout: Double = 120
    /// A migration's engine standing by takes over from a lost engine (true: it serves now).
    public let standbyTakesOver: @Sendable () -> Bool

    public init(runner: any DaemonRunner & Sendable, engine: @autoclosure @escaping @Sendable () -> Daemon, socket: String, control: String,
                standbyTakesOver: @escaping @Sendable () -> Bool = { false }) {
        self.runner = runner
        self.currentEngine = engine
        self.socket = socket
        self.control = control
        self.standbyTakesOver = standbyTakesOver
    }

    public var name: String { "this node" }

    public func ran(_ endpoint: EngineEndpoint) -> Bool { endpoint.address == .unix(path: socket) }

    public func answers(_ calls: CancellableCalls) -> Bool { true }

    public func startEngine(_ spec: EngineSpec, restartRunning: Bool, _ calls: CancellableCalls) throws -> StartedEngine {
        var alreadyRunning = runner.isRunning(engine)
        var detail = ""
        if alreadyRunning && (restartRunning || !alive(within: 5)) {
            try runner.killNow(engine)
            alreadyRunning = false
            detail = restartRunning ? "restarted: it did not answer the device" : "restarted: its control API did not answer within 5 s"
        }
        if !alreadyRunning && standbyTakesOver() {
            alreadyRunning = true
            detail = "a migration's engine B took over"
        } else if !alreadyRunning && runner.isRunning(engine) {
            // A migration's confirm, which held the volume meanwhile, made engine B the volume's engine.
            alreadyRunning = true
            detail = "a migration's engine B took its place"
        } else if !alreadyRunning {
            do { try runner.startAgain(engine) } catch {
                throw KeelError("cannot start the \(engine.description): \(runner.lastFailure(engine) ?? "\(error)")")
            }
        }
        let deadline = monotonicSeconds() + startTimeout
        while !calls.isCancelled && monotonicSeconds() < deadline {
            if controlAnswers(within: 3) {
                return StartedEngine(endpoint: EngineEndpoint(address: .unix(path: socket), exportName: spec.volume),
                                     alreadyRunning: alreadyRunning, detail: detail)
            }
            guard runner.isRunning(engine) else {
                throw KeelError("the \(engine.description) stopped: \(runner.lastFailure(engine) ?? "see its log")")
            }
            usleep(100_000)
        }
        throw KeelError("the \(engine.description) did not serve within \(Int(startTimeout)) s")
    }

    /// It answers at all, serving or still starting: not hung.
    private func alive(within seconds: Double) -> Bool {
        let control = Syscalls.SocketAddress.unix(path: control)
        return (try? blocking { await engineAnswers(control: control, within: seconds) }) ?? false
    }

    private func controlAnswers(within seconds: Int64) -> Bool {
        (try? blocking {
            try await withControlClient(.unix(path: control)) {
                try await EngineStub(wrapping: $0).status(.init(), options: .timeout(seconds: seconds))
            }
        }) != nil
    }
}
