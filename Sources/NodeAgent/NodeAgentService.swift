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
        /// The engines' NBD listener: TLS with the agent's credentials, or `--tls off` beyond loopback.
        public var engineListenerArguments: [String]
        /// Replicas placed here: `--tls off` beyond loopback (their engines' links are plaintext).
        public var replicaListenerArguments: [String]
        /// Seconds an engine may take to claim its replicas and serve.
        public var startTimeout: Double

        public init(name: String, host: String, layout: NodeLayout, version: String,
                    engineListenerArguments: [String], replicaListenerArguments: [String] = [], startTimeout: Double = 120) {
            self.name = name
            self.host = host
            self.layout = layout
            self.version = version
            self.engineListenerArguments = engineListenerArguments
            self.replicaListenerArguments = replicaListenerArguments
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
        try Self.validate(request)
        let engine = engineDaemon(request)
        let address = self.address(port: request.port)
        var alreadyRunning = try await offThePool { runner.isRunning(engine) }
        if alreadyRunning, let why = try await restartReason(engine, asked: request.restartRunning) {
            try await offThePool {
                do { try runner.killNow(engine) } catch {
                    throw RPCError(code: .internalError, message: "cannot restart the \(engine.description) on \(settings.name) (\(why)): \(error)")
                }
            }
            alreadyRunning = false
        }
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

    public func startReplica(request: Keel_Control_V1_StartReplicaRequest,
                             context: ServerContext) async throws -> Keel_Control_V1_StartedReplica {
        try Self.validateReplica(volume: request.volume, volumeID: request.volumeID)
        guard request.size > 0, request.size % 4096 == 0, request.port <= UInt32(UInt16.max) - 1 else {
            throw RPCError(code: .invalidArgument, message: "a replica needs a size (a multiple of 4 KiB) and a port below 65535")
        }
        let name = settings.layout.placedReplicaName(volume: request.volume, volumeID: request.volumeID, index: Int(request.index))
        if try await offThePool({ runner.isRunning(Daemon(kind: .replica, instance: name, arguments: [])) }) {
            guard request.port > 0 else {
                throw RPCError(code: .alreadyExists, message: "replica \(request.index) of \(request.volume) already runs on \(settings.name)")
            }
            return .with { $0.address = address(port: request.port); $0.alreadyRunning = true }
        }
        let port = try request.port > 0 ? UInt16(request.port) : freePortPair()
        let directory = settings.layout.placedReplicaDirectory(volumeID: request.volumeID, index: Int(request.index))
        let replica = Daemon(kind: .replica, instance: name,
                             arguments: ["--dir", directory, "--listen", address(port: UInt32(port)), "--size", "\(request.size)"]
                                 + settings.replicaListenerArguments)
        try await offThePool {
            do {
                try makeDirectories(settings.layout.placedVolumeDirectory(volumeID: request.volumeID))
                try runner.start(replica)
            } catch {
                let reason = runner.lastFailure(replica) ?? "\(error)"
                try? runner.stop(replica)
                throw RPCError(code: .failedPrecondition, message: "cannot start \(replica.description) on \(settings.name): \(reason)")
            }
        }
        try await waitUntilAccepting(replica, port: port)
        return .with { $0.address = address(port: UInt32(port)); $0.alreadyRunning = false }
    }

    public func stopReplica(request: Keel_Control_V1_StopReplicaRequest,
                            context: ServerContext) async throws -> Keel_Control_V1_NodeHealth {
        try Self.validateReplica(volume: request.volume, volumeID: request.volumeID)
        let index = Int(request.index)
        let replica = Daemon(kind: .replica, instance: settings.layout.placedReplicaName(
            volume: request.volume, volumeID: request.volumeID, index: index), arguments: [])
        try await offThePool {
            do { try runner.stop(replica) } catch {
                throw RPCError(code: .internalError, message: "cannot stop \(replica.description) on \(settings.name): \(error)")
            }
            guard request.removeData else { return }
            runner.forget(replica)
            let volumeDirectory = settings.layout.placedVolumeDirectory(volumeID: request.volumeID)
            do {
                let directory = settings.layout.placedReplicaDirectory(volumeID: request.volumeID, index: index)
                if FileManager.default.fileExists(atPath: directory) { try FileManager.default.removeItem(atPath: directory) }
                rmdir(volumeDirectory)  // the volume's last replica here: its directory goes too
            } catch {
                throw RPCError(code: .internalError, message: "cannot remove the data of \(replica.description) on \(settings.name): \(error)")
            }
        }
        return try await health(request: .init(), context: context)
    }

    static func validate(_ request: Keel_Control_V1_StartEngineRequest) throws {
        if let problem = VolumeRecord.validate(name: request.volume) {
            throw RPCError(code: .invalidArgument, message: "volume: \(problem)")
        }
        guard request.size > 0, !request.replicas.isEmpty, request.port > 0, request.port <= UInt32(UInt16.max) else {
            throw RPCError(code: .invalidArgument, message: "an engine needs a size, replicas and a port")
        }
    }

    private static func validateReplica(volume: String, volumeID: String) throws {
        if let problem = VolumeRecord.validate(name: volume) {
            throw RPCError(code: .invalidArgument, message: "volume: \(problem)")
        }
        guard !volumeID.isEmpty, volumeID.allSatisfy({ $0.isHexDigit || $0 == "-" }) else {
            throw RPCError(code: .invalidArgument, message: "a replica placed on a node needs its volume's identity (hex digits and dashes)")
        }
    }

    /// HOST:PORT on this node's address ([HOST]:PORT for IPv6), for its engines and replicas.
    func address(port: UInt32) -> String {
        "\(settings.host.contains(":") ? "[\(settings.host)]" : settings.host):\(port)"
    }

    /// Replicas placed here listen from 11000 up, each on a port and the next (its control API).
    private func freePortPair() throws -> UInt16 {
        for port in stride(from: UInt16(11000), to: 12000, by: 2) {
            if isFree(port) && isFree(port + 1) { return port }
        }
        throw RPCError(code: .resourceExhausted, message: "no free port pair between 11000 and 12000 on \(settings.name)")
    }

    private func isFree(_ port: UInt16) -> Bool {
        guard let fd = try? Socket.listen(on: .tcp(host: settings.host, port: port)) else { return false }
        fd.close()
        return true
    }

    /// Until the replica accepts connections on its port, it stops, or 30 s.
    private func waitUntilAccepting(_ replica: Daemon, port: UInt16) async throws {
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            if let fd = try? Socket.connect(to: .tcp(host: settings.host, port: port), timeout: 1000) {
                fd.close()
                return
            }
            if try await offThePool({ !runner.isRunning(replica) }) {
                let reason = try await offThePool { runner.lastFailure(replica) } ?? "it stopped without saying why"
                throw RPCError(code: .failedPrecondition, message: "\(replica.description) on \(settings.name) did not start: \(reason)")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw RPCError(code: .deadlineExceeded, message: "\(replica.description) on \(settings.name) did not accept connections within 30 s")
    }

    func engineDaemon(_ request: Keel_Control_V1_StartEngineRequest) -> Daemon {
        var arguments = ["--size", "\(request.size)"]
        for replica in request.replicas { arguments += ["--replica", replica] }
        arguments += ["--listen", address(port: request.port), "--control", "unix:" + settings.layout.engineControl(request.volume)]
        arguments += settings.engineListenerArguments
        if !request.volumeID.isEmpty { arguments += ["--volume-id", request.volumeID] }
        if request.replicaTimeout > 0 { arguments += ["--replica-timeout", "\(request.replicaTimeout)"] }
        return Daemon(kind: .engine, instance: request.volume, arguments: arguments)
    }

    /// Why a running engine must be killed and started again, or nil to keep it:
    /// its client says it does not answer, or its own control API does not (hung, or stopped by a signal).
    private func restartReason(_ engine: Daemon, asked: Bool) async throws -> String? {
        if asked { return "its device frontend gets no answer from it" }
        let control = Syscalls.SocketAddress.unix(path: settings.layout.engineControl(engine.instance))
        let seconds = 5.0
        return await engineAnswers(control: control, within: seconds) ? nil : "its control API did not answer within \(Int(seconds)) s"
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
