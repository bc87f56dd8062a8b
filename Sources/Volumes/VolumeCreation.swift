import ControlAPI
import Daemons
import Foundation
import NodeRegistry
import Syscalls

/// What a new volume is to be: its size, and where its replicas and engine go.
public struct VolumeSpec: Sendable {
    public var name: String
    public var size: UInt64
    /// How many replicas, counting those placed on other nodes (ignored with `replicaAddresses`).
    public var replicas: Int
    /// Replicas already served elsewhere, by data address.
    public var replicaAddresses: [String]
    /// Nodes to place one replica each on, through their agents; the rest go on this host.
    public var replicaNodes: [String]
    /// Where the engine may run, in order; empty: this host.
    public var engineNodes: [String]
    public var connections: Int

    public init(name: String, size: UInt64, replicas: Int = 3, replicaAddresses: [String] = [],
                replicaNodes: [String] = [], engineNodes: [String] = [], connections: Int = 2) {
        self.name = name
        self.size = size
        self.replicas = replicas
        self.replicaAddresses = replicaAddresses
        self.replicaNodes = replicaNodes
        self.engineNodes = engineNodes
        self.connections = connections
    }

    /// What is wrong with the spec, phrased with the CLI's options, or nil.
    public func problem(layout: NodeLayout) -> String? {
        if let problem = VolumeRecord.validate(name: name) { return problem }
        guard size > 0, size % 4096 == 0 else { return "--size must be a positive multiple of 4 KiB, e.g. 10G" }
        guard (1...16).contains(replicas), replicaAddresses.count <= 16 else { return "a volume has 1 to 16 replicas" }
        guard (1...16).contains(connections) else { return "--connections must be between 1 and 16" }
        guard Set(engineNodes).count == engineNodes.count, engineNodes.count <= 16 else {
            return "--engine-node names each node once, at most 16"
        }
        guard Set(replicaNodes).count == replicaNodes.count else {
            return "--replica-node names each node once: a node holds one replica of a volume"
        }
        guard replicaNodes.isEmpty || replicaAddresses.isEmpty else {
            return "give replicas either by node (--replica-node) or by address (--replica), not both"
        }
        guard replicaNodes.count <= replicas else {
            return "--replica-node names \(replicaNodes.count) nodes but the volume has \(replicas) replicas; raise --replicas"
        }
        let longest = layout.longestSocketPath(volume: name)
        guard longest <= 107 else {
            return "the state directory's path is too long for unix sockets (\(longest) of 107 bytes); use a shorter --state-dir or name"
        }
        return nil
    }
}

extension Node {
    /// Engines on other nodes listen from here up, one port per volume of this node.
    public static let firstEnginePort = 10810

    /// Creates the volume: starts its replicas here and on the nodes named,
    /// checks those given by address, and registers it. On any failure
    /// nothing is left, here or on the nodes.
    public func createVolume(_ spec: VolumeSpec, credentials: ControlCredentials) throws -> VolumeRecord {
        if let problem = spec.problem(layout: layout) { throw KeelError(problem) }
        let held = try lock(spec.name)
        defer { held.unlock() }
        if try registry.volume(named: spec.name) != nil { throw KeelError("\(Registry.Failure.exists(spec.name))") }
        let dataDirectory = layout.volumeDataDirectory(spec.name)
        if spec.replicaAddresses.isEmpty && access(dataDirectory, F_OK) == 0 {
            throw KeelError("\(dataDirectory) already exists (left by an earlier volume?); remove it or pick another name")
        }
        let runnerKind: VolumeRecord.Runner = systemdIsRunning() ? .systemd : .keel
        if runnerKind == .systemd {
            do { try SystemdRunner(stateDirectory: layout.stateDirectory).checkUnitsInstalled() } catch {
                throw KeelError("\(error)")
            }
        }
        var record = VolumeRecord(name: spec.name, id: UUID().uuidString.lowercased(), size: spec.size, replicas: [],
                                  connections: spec.connections,
                                  runner: runnerKind, createdAt: Int64(Date().timeIntervalSince1970))
        try placeEngine(&record, spec)
        let replicaAgents = try spec.replicaNodes.map(replicaNode)
        credentials.apply()
        if spec.replicaAddresses.isEmpty {
            record.replicas = (0..<(spec.replicas - spec.replicaNodes.count)).map { index in
                ReplicaRecord(address: "unix:" + layout.replicaSocket(volume: spec.name, index: index),
                              directory: layout.replicaDirectory(volume: spec.name, index: index), slot: index)
            }
        } else {
            record.replicas = try spec.replicaAddresses.enumerated().map { slot, text in
                let address = try parseListenAddress(text, option: "--replica")
                try checkServedReplica(address, size: spec.size)
                return ReplicaRecord(address: "\(address)", slot: slot)
            }
        }
        do {
            try startReplicas(record)
            for agent in replicaAgents {
                record.replicas.append(try RemoteReplicas(volume: record, node: self, credentials: credentials)
                    .place(slot: record.replicas.count, on: agent))
            }
            try registry.add(record)
        } catch {
            // Nothing half-made: what was started here and on the nodes goes.
            try? removeLocalReplicas(record)
            _ = RemoteReplicas(volume: record, node: self, credentials: credentials).remove()
            throw error as? KeelError ?? KeelError("\(error)")
        }
        return record
    }

    /// The engine's nodes must be known; an engine elsewhere reaches its replicas over TCP.
    private func placeEngine(_ record: inout VolumeRecord, _ spec: VolumeSpec) throws {
        let elsewhere = spec.engineNodes == [thisNodeName] ? [] : spec.engineNodes
        guard !elsewhere.isEmpty else { return }
        for name in elsewhere where try registry.node(named: name) == nil {
            if name == thisNodeName {
                throw KeelError("--engine-node \(name) is this host: to fail over between it and other nodes, serve its agent (keel node serve) and add it under another name with 'keel node add'")
            }
            throw KeelError("no node named \(name) for --engine-node; add it with 'keel node add \(name) HOST:PORT' (see 'keel node ls')")
        }
        let overTCP = spec.replicaAddresses.isEmpty ? spec.replicaNodes.count == spec.replicas
                                                    : spec.replicaAddresses.allSatisfy { !$0.hasPrefix("unix:") }
        guard overTCP else {
            throw KeelError("an engine on another node reaches its replicas over TCP: place all \(spec.replicas) with --replica-node NAME, or give them with --replica HOST:PORT")
        }
        record.engineNodes = elsewhere
        let taken = Set(try registry.volumes().map(\.enginePort))
        record.enginePort = (Self.firstEnginePort...).first { !taken.contains($0) }!
    }

    /// A node named by --replica-node must be known, and not this host (whose replicas need no agent).
    private func replicaNode(_ name: String) throws -> NodeRecord {
        if let known = try registry.node(named: name) { return known }
        if name == thisNodeName {
            throw KeelError("--replica-node \(name) is this host: the replicas not placed on other nodes go here already (--replicas counts them all)")
        }
        throw KeelError("no node named \(name) for --replica-node; add it with 'keel node add \(name) HOST:PORT' (see 'keel node ls')")
    }

    /// A replica given by address must already serve, with the volume's size.
    func checkServedReplica(_ address: Syscalls.SocketAddress, size: UInt64) throws {
        let control = defaultControlAddress(forData: address)
        let status: Keel_Control_V1_ReplicaStatus
        do { status = try replicaStatus(control) } catch {
            throw KeelError("cannot reach replica \(address) (control API \(control)): \(error); start it with 'keel replica serve --size \(size)' there")
        }
        guard status.size == size else {
            throw KeelError("replica \(address) holds \(status.size) bytes, not \(size); give the volume its size or use another replica")
        }
    }

    /// Stops the volume's local replicas, forgets their daemons and deletes their data.
    public func removeLocalReplicas(_ volume: VolumeRecord) throws {
        let runner = self.runner(volume.runner)
        for (daemon, _) in localReplicas(volume) {
            try runner.stop(daemon)
            runner.forget(daemon)
        }
        let directory = layout.volumeDataDirectory(volume.name)
        if FileManager.default.fileExists(atPath: directory) { try FileManager.default.removeItem(atPath: directory) }
    }
}
