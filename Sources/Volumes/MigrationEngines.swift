import ControlAPI
import Daemons
import Foundation
import NodeRegistry
import Syscalls

/// A migration's engine A, the one serving when it started: this node's
/// engine daemon, or the engine an engine node's agent runs.
protocol MigrationEngineA {
    /// Stops it once it has answered everything it read (the switch's drain).
    func stop() throws
    /// After the switch: what is left of it goes (a unit is disabled).
    func retire()
    /// It was lost while B stood by: a hung one must not write after B claims.
    func kill()
    /// Starts it again after B failed to take over; its NBD address.
    func restart() throws -> String
    /// After B was lost having taken over, the device frontend starts an engine
    /// itself (on an engine node); this node's engine the migration starts again.
    var frontendRestartsIt: Bool { get }
}

/// A migration's engine B, standing by until it is activated.
protocol MigrationEngineB {
    /// Its NBD address once it serves: where the device switches to.
    var endpoint: String { get }
    /// Refuses when it does not stand by with every session open.
    func checkStandingBy() throws
    /// Claims the replicas with the next epoch and takes the engine's place (its names, its
    /// pid file). A failure to take the place, once it serves, is `EngineServesUnrecorded`.
    func activate() throws -> Keel_Control_V1_Activated
    /// After its activation: whether it still runs.
    var runs: Bool { get }
    /// Stops it if it runs; nothing it had stays.
    func stop()
}

// MARK: - On this node

struct LocalEngineA: MigrationEngineA {
    let node: Node
    let volume: VolumeRecord

    private var runner: any DaemonRunner { node.runner(volume.runner) }
    private var engine: Daemon { node.engineDaemon(volume) }

    func stop() throws {
        if let systemd = runner as? SystemdRunner { try systemd.stopOnly(engine) } else { try runner.stop(engine) }
    }

    func retire() {
        if let systemd = runner as? SystemdRunner { try? systemd.disable(engine) }
    }

    func kill() { if runner.isRunning(engine) { try? runner.killNow(engine) } }

    var frontendRestartsIt: Bool { false }

    func restart() throws -> String {
        try runner.start(engine)
        // Under systemd B's unit may have become the volume's: A's is again.
        try node.registry.setEngineUnit(volume.engineUnit, of: volume.name)
        try node.waitForEngine(of: volume.name, engine, runner: runner, before: Date().addingTimeInterval(120), timeout: 120)
        return "unix:" + node.layout.engineSocket(volume.name)
    }
}

extension StandbyEngine: MigrationEngineB {
    var endpoint: String { "unix:" + node.layout.engineSocket(volume.name) }

    func activate() throws -> Keel_Control_V1_Activated {
        let activated = try activateHere()
        try takePlace()
        return activated
    }

    var runs: Bool { node.runner(volume.runner).isRunning(node.engineDaemon(volume)) }
}

// MARK: - On engine nodes

/// Where a migration between engine nodes goes from and to, kept as the
/// record's target ("node c, from node b").
struct NodesMigrationTarget: Equatable {
    var to: String
    var from: String

    var description: String { "node \(to), from node \(from)" }

    init(to: String, from: String) {
        self.to = to
        self.from = from
    }

    init?(_ record: MigrationRecord) {
        let parts = record.target.components(separatedBy: ", from node ")
        guard parts.count == 2, parts[0].hasPrefix("node ") else { return nil }
        self.init(to: String(parts[0].dropFirst("node ".count)), from: parts[1])
    }
}

extension Node {
    /// What an agent needs to start the volume's engine.
    func engineSpec(_ volume: VolumeRecord) -> EngineSpec {
        EngineSpec(volume: volume.name, volumeID: volume.id, size: volume.size, replicas: volume.engineReplicas.map(\.address),
                   port: UInt32(volume.enginePort), replicaTimeout: 0)
    }

    /// The registered node `name`, or why there is none.
    func registeredNode(_ name: String) throws -> NodeRecord {
        guard let record = try registry.node(named: name) else {
            throw KeelError("no node named \(name) is registered; add it with 'keel node add \(name) HOST:PORT' (see 'keel node ls')")
        }
        return record
    }

    /// The engine node whose engine the volume's device frontend is connected to (by the engine's host).
    func servingEngineNode(_ volume: VolumeRecord) -> NodeRecord? {
        guard let status = FrontendStatusFile.read(layout.frontendStatus(volume.name)),
              case .tcp(let host, _)? = try? Syscalls.SocketAddress(parsing: status.engine) else { return nil }
        return engineNodes(volume).first { AgentPlace(address: $0.address).hosts(host) }
    }
}

struct RemoteEngineA: MigrationEngineA {
    let node: Node
    let volume: VolumeRecord
    let agent: NodeRecord

    func stop() throws {
        _ = try callNode(agent.address, doing: "stop the engine of \(volume.name)") { [name = volume.name] in
            try await $0.stopEngine(.with { $0.volume = name }, options: .timeout(seconds: 150))
        }
    }

    func retire() {}

    func kill() {
        _ = try? callNode(agent.address, doing: "stop the engine of \(volume.name)") { [name = volume.name] in
            try await $0.stopEngine(.with { $0.volume = name }, options: .timeout(seconds: 10))
        }
    }

    var frontendRestartsIt: Bool { true }

    func restart() throws -> String {
        let started = try AgentPlace(address: agent.address).startEngine(node.engineSpec(volume), restartRunning: false, CancellableCalls())
        return "\(started.endpoint.address)"
    }
}

struct RemoteEngineB: MigrationEngineB {
    let volume: VolumeRecord
    let agent: NodeRecord
    let endpoint: String

    /// Starts it on `agent`'s node, standing by; returns once it does.
    static func start(_ spec: EngineSpec, on agent: NodeRecord, volume: VolumeRecord) throws -> RemoteEngineB {
        let started = try callNode(agent.address, doing: "start engine B of \(spec.volume)") { [request = spec.request] in
            try await $0.startStandbyEngine(request, options: .timeout(seconds: 150))
        }
        return RemoteEngineB(volume: volume, agent: agent, endpoint: started.address)
    }

    /// The one standing by on `agent`'s node; its address from the agent's host and the volume's port.
    init(volume: VolumeRecord, agent: NodeRecord) {
        let host = agent.address.split(separator: ":").dropLast().joined(separator: ":")
        self.init(volume: volume, agent: agent, endpoint: "\(host):\(volume.enginePort)")
    }

    private init(volume: VolumeRecord, agent: NodeRecord, endpoint: String) {
        self.volume = volume
        self.agent = agent
        self.endpoint = endpoint
    }

    func checkStandingBy() throws {
        let alive = try callNode(agent.address, doing: "say whether engine B of \(volume.name) stands by") { [name = volume.name] in
            try await $0.standbyEngineState(.with { $0.volume = name }, options: .timeout(seconds: 5))
        }
        try checkStandby(alive)
    }

    func activate() throws -> Keel_Control_V1_Activated {
        do {
            return try callNode(agent.address, doing: "have engine B take \(volume.name) over") { [name = volume.name] in
                try await $0.activateStandbyEngine(.with { $0.volume = name }, options: .timeout(seconds: 150))
            }
        } catch let error as KeelError where error.message.contains(EngineServesUnrecorded.agentsWords) {
            throw EngineServesUnrecorded(message: error.message)
        }
    }

    var runs: Bool {
        let health = try? callNode(agent.address, doing: "report its health") { try await $0.health(.init(), options: .timeout(seconds: 5)) }
        return health?.daemons.contains { $0.kind == "engine" && $0.instance == volume.name && $0.running } == true
    }

    func stop() {
        _ = try? callNode(agent.address, doing: "stop engine B of \(volume.name)") { [name = volume.name] in
            try await $0.stopStandbyEngine(.with { $0.volume = name }, options: .timeout(seconds: 60))
        }
    }
}

/// Engine B took the volume over (it serves, it claimed the replicas) but could not take the
/// engine's place in the records: stopping it would leave the volume without an engine.
struct EngineServesUnrecorded: Error, CustomStringConvertible {
    /// How an agent's answer to ActivateStandbyEngine says it (keel_control.proto).
    static let agentsWords = "cannot be recorded as its engine"
    let message: String

    init(message: String) { self.message = message }

    init(volume: String, _ error: Error) {
        message = "the new engine serves \(volume) but \(Self.agentsWords): \(error)"
    }

    var description: String { message }
}
