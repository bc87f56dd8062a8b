import ControlAPI
import Daemons
import Foundation
import GRPCCore
import NodeRegistry
import Syscalls

/// `keel node serve`: what other nodes may ask of this one. Engines run as
/// this node's daemons (systemd units or keel's own processes), listening on
/// the node's address; each start returns once the engine serves, or fails
/// with the engine's own one-line reason.
public struct NodeAgentService: Keel_Control_V1_NodeControl.SimpleServiceProtocol {
    public struct Settings: Sendable {
        /// The node's name, its hostname by default.
        public var name: String
        /// The host engines listen on: the agent's own address.
        public var host: String
        public var layout: NodeLayout
        public var version: String
        /// `--tls off` for engines on an address beyond loopback: the device frontend's link is plaintext.
        public var engineListenerArguments: [String]
        /// Seconds an engine may take to claim its replicas and serve.
        public var startTimeout: Double

        public init(name: String, host: String, layout: NodeLayout, version: String,
                    engineListenerArguments: [String], startTimeout: Double = 120) {
            self.name = name
            self.host = host
            self.layout = layout
            self.version = version
            self.engineListenerArguments = engineListenerArguments
            self.startTimeout = startTimeout
        }
    }

    let settings: Settings
    let runner: any DaemonRunner & Sendable

    public init(settings: Settings, runner: any DaemonRunner & Sendable) {
        self.settings = settings
        self.runner = runner
    }

    public func health(request: Keel_Control_V1_NodeHealthRequest,
                       context: ServerContext) async throws -> Keel_Control_V1_NodeHealth {
        let daemons = try await offThePool {
            runner.census().map { entry in
                Keel_Control_V1_NodeDaemon.with {
                    $0.kind = entry.kind.rawValue
                    $0.instance = entry.instance
                    $0.running = entry.running
                }
            }
        }
        var load = [Double](repeating: 0, count: 1)
        _ = getloadavg(&load, 1)
        return .with {
            $0.name = settings.name
            $0.version = settings.version
            $0.daemons = daemons
            $0.loadAverage = load[0]
        }
    }

    public func startEngine(request: Keel_Control_V1_StartEngineRequest,
                            context: ServerContext) async throws -> Keel_Control_V1_StartedEngine {
        if let problem = VolumeRecord.validate(name: request.volume) {
            throw RPCError(code: .invalidArgument, message: "volume: \(problem)")
        }
        guard request.size > 0, !request.replicas.isEmpty, request.port > 0, request.port <= UInt32(UInt16.max) else {
            throw RPCError(code: .invalidArgument, message: "an engine needs a size, replicas and a port")
        }
        let engine = engineDaemon(request)
        let address = "\(settings.host.contains(":") ? "[\(settings.host)]" : settings.host):\(request.port)"
        let alreadyRunning = try await offThePool { runner.isRunning(engine) }
        if !alreadyRunning {
            try await offThePool {
                do { try runner.start(engine) } catch {
                    let reason = runner.lastFailure(engine) ?? "\(error)"
                    try? runner.stop(engine)
                    throw RPCError(code: .failedPrecondition, message: "cannot start the \(engine.description) on \(settings.name): \(reason)")
                }
            }
        }
        let epoch = try await waitUntilServing(engine)
        return .with {
            $0.address = address
            $0.epoch = epoch
            $0.alreadyRunning = alreadyRunning
        }
    }

    public func stopEngine(request: Keel_Control_V1_StopEngineRequest,
                           context: ServerContext) async throws -> Keel_Control_V1_NodeHealth {
        if let problem = VolumeRecord.validate(name: request.volume) {
            throw RPCError(code: .invalidArgument, message: "volume: \(problem)")
        }
        let engine = Daemon(kind: .engine, instance: request.volume, arguments: [])
        try await offThePool {
            do { try runner.stop(engine) } catch {
                throw RPCError(code: .internalError, message: "cannot stop the \(engine.description) on \(settings.name): \(error)")
            }
        }
        return try await health(request: .init(), context: context)
    }

    func engineDaemon(_ request: Keel_Control_V1_StartEngineRequest) -> Daemon {
        var arguments = ["--size", "\(request.size)"]
        for replica in request.replicas { arguments += ["--replica", replica] }
        let host = settings.host.contains(":") ? "[\(settings.host)]" : settings.host
        arguments += ["--listen", "\(host):\(request.port)", "--control", "unix:" + settings.layout.engineControl(request.volume)]
        arguments += settings.engineListenerArguments
        if !request.volumeID.isEmpty { arguments += ["--volume-id", request.volumeID] }
        if request.replicaTimeout > 0 { arguments += ["--replica-timeout", "\(request.replicaTimeout)"] }
        return Daemon(kind: .engine, instance: request.volume, arguments: arguments)
    }

    /// Until the engine's control API answers (it has claimed its replicas), it stops, or the start timeout.
    private func waitUntilServing(_ engine: Daemon) async throws -> UInt64 {
        let control = Syscalls.SocketAddress.unix(path: settings.layout.engineControl(engine.instance))
        let deadline = Date().addingTimeInterval(settings.startTimeout)
        while Date() < deadline {
            if let status = try? await withControlClient(control, {
                try await Keel_Control_V1_EngineControl.Client(wrapping: $0).status(.init())
            }) { return status.epoch }
            if try await offThePool({ !runner.isRunning(engine) }) {
                let reason = try await offThePool { runner.lastFailure(engine) } ?? "it stopped without saying why"
                throw RPCError(code: .failedPrecondition, message: "the \(engine.description) on \(settings.name) did not start: \(reason)")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw RPCError(code: .deadlineExceeded,
                       message: "the \(engine.description) on \(settings.name) did not serve within \(Int(settings.startTimeout)) s")
    }
}
