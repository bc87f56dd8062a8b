import ArgumentParser
import ControlAPI
import Daemons
import Foundation
import GRPCCore
import NodeRegistry
import Syscalls

struct Volume: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Volumes of this node by name: create, attach as /dev/nbdX and /dev/keel/NAME, detach, remove.",
        discussion: """
            The node registry (SQLite) lives in the state directory. When PID 1 is systemd the daemons \
            are units (keel-replica@, keel-engine@; install them with scripts/install), otherwise keel \
            runs them itself as processes tracked by pid files.
            """,
        subcommands: [Create.self, List.self, Show.self, Attach.self, Detach.self, Remove.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a volume: its replicas on this node, or existing replicas elsewhere.",
            discussion: """
                Without --replica, starts N replicas on this node under the state directory. \
                With --replica, uses replicas already served (keel replica serve --size SIZE) at those \
                addresses; each must be reachable and of the volume's size.
                Examples: keel volume create db --size 10G
                          keel volume create db --size 10G --replica 10.0.0.2:7001 --replica 10.0.0.3:7001
                """)

        @Argument(help: "The volume's name (also /dev/keel/NAME).")
        var name: String

        @Option(help: "The volume's size, e.g. 10G (binary units, a multiple of 4 KiB).")
        var size: ByteCount

        @Option(help: "How many replicas to start on this node (without --replica).")
        var replicas: Int = 3

        @Option(name: .customLong("replica"), help: "A replica's data address, HOST:PORT or unix:/path (repeat for each).")
        var replicaAddresses: [String] = []

        @Option(help: "Connections of the kernel device once attached (fixed while attached).")
        var connections: Int = 2

        @Option(name: .customLong("engine-node"), help: ArgumentHelp("A node the engine may run on, by the name 'keel node add' gave it (repeat, in order of preference; default: this host). The device frontend on this host has the first that answers start it, and fails it over to the next when its node is lost.", valueName: "name"))
        var engineNodes: [String] = []

        @Flag(help: "Print the volume as JSON.")
        var json = false

        @OptionGroup var node: NodeOptions

        func validate() throws {
            if let problem = VolumeRecord.validate(name: name) { throw ValidationError(problem) }
            guard size.bytes > 0, size.bytes % 4096 == 0 else {
                throw ValidationError("--size must be a positive multiple of 4 KiB, e.g. 10G")
            }
            guard (1...16).contains(replicas), replicaAddresses.count <= 16 else {
                throw ValidationError("a volume has 1 to 16 replicas")
            }
            guard (1...16).contains(connections) else { throw ValidationError("--connections must be between 1 and 16") }
            guard Set(engineNodes).count == engineNodes.count, engineNodes.count <= 16 else {
                throw ValidationError("--engine-node names each node once, at most 16")
            }
            let longest = node.layout.longestSocketPath(volume: name)
            guard longest <= 107 else {
                throw ValidationError("the state directory's path is too long for unix sockets (\(longest) of 107 bytes); use a shorter --state-dir or name")
            }
        }

        func run() throws {
            let node = try Node(self.node)
            try node.lock(name)
            if try node.registry.volume(named: name) != nil { throw CLIError("\(Registry.Failure.exists(name))") }
            let dataDirectory = node.layout.volumeDataDirectory(name)
            if replicaAddresses.isEmpty && access(dataDirectory, F_OK) == 0 {
                throw CLIError("\(dataDirectory) already exists (left by an earlier volume?); remove it or pick another name")
            }
            let runnerKind: VolumeRecord.Runner = systemdIsRunning() ? .systemd : .keel
            if runnerKind == .systemd {
                do { try SystemdRunner(stateDirectory: node.layout.stateDirectory).checkUnitsInstalled() } catch {
                    throw CLIError("\(error)")
                }
            }
            var record = VolumeRecord(name: name, id: UUID().uuidString.lowercased(), size: size.bytes, replicas: [],
                                      connections: connections,
                                      runner: runnerKind, createdAt: Int64(Date().timeIntervalSince1970))
            try place(&record, node: node)
            if replicaAddresses.isEmpty {
                record.replicas = (0..<replicas).map { index in
                    ReplicaRecord(address: "unix:" + node.layout.replicaSocket(volume: name, index: index),
                                  directory: node.layout.replicaDirectory(volume: name, index: index))
                }
            } else {
                record.replicas = try replicaAddresses.map { text in
                    let address = try parseListenAddress(text, option: "--replica")
                    try checkRemoteReplica(address)
                    return ReplicaRecord(address: "\(address)")
                }
            }
            do {
                try node.startReplicas(record)
                try node.registry.add(record)
            } catch {
                try? removeLocalReplicas(record, node: node)
                throw error as? CLIError ?? CLIError("\(error)")
            }
            if json {
                try printJSON(VolumeReport(record, node: node).json)
            } else if record.enginePlacedElsewhere {
                print("volume \(name): \(humanSize(record.size)), \(record.replicas.count) replica(s), engine on "
                    + record.engineNodes.joined(separator: " or ") + "; attach it with 'keel volume attach \(name)'")
            } else {
                let local = record.replicas.filter(\.isLocal).count
                print("volume \(name): \(humanSize(record.size)), \(record.replicas.count) replica(s)"
                    + (local > 0 ? " on this node" : "") + ", run by \(runnerKind.rawValue); attach it with 'keel volume attach \(name)'")
            }
        }

        /// The engine's nodes must be known; an engine elsewhere reaches its replicas over TCP.
        private func place(_ record: inout VolumeRecord, node: Node) throws {
            let elsewhere = engineNodes == [thisNodeName] ? [] : engineNodes
            guard !elsewhere.isEmpty else { return }
            for name in elsewhere where try node.registry.node(named: name) == nil {
                if name == thisNodeName {
                    throw CLIError("--engine-node \(name) is this host: to fail over between it and other nodes, serve its agent (keel node serve) and add it under another name with 'keel node add'")
                }
                throw CLIError("no node named \(name) for --engine-node; add it with 'keel node add \(name) HOST:PORT' (see 'keel node ls')")
            }
            guard !replicaAddresses.isEmpty, replicaAddresses.allSatisfy({ !$0.hasPrefix("unix:") }) else {
                throw CLIError("an engine on another node reaches its replicas over TCP: give them with --replica HOST:PORT")
            }
            record.engineNodes = elsewhere
            let taken = Set(try node.registry.volumes().map(\.enginePort))
            record.enginePort = (Self.firstEnginePort...).first { !taken.contains($0) }!
        }

        /// Engines on other nodes listen from here up, one port per volume of this node.
        static let firstEnginePort = 10810

        /// A replica elsewhere must already serve, with the volume's size.
        private func checkRemoteReplica(_ address: Syscalls.SocketAddress) throws {
            let control = defaultControlAddress(forData: address)
            let status: Keel_Control_V1_ReplicaStatus
            do { status = try replicaStatus(control) } catch {
                throw CLIError("cannot reach replica \(address) (control API \(control)): \(error); start it with 'keel replica serve --size \(size.bytes)' there")
            }
            guard status.size == size.bytes else {
                throw CLIError("replica \(address) holds \(status.size) bytes, not \(size.bytes); give the volume its size or use another replica")
            }
        }
    }
}

typealias ReplicaStub = Keel_Control_V1_ReplicaControl.Client<ControlTransport>

func replicaStatus(_ control: Syscalls.SocketAddress) throws -> Keel_Control_V1_ReplicaStatus {
    do {
        return try blocking {
            try await withControlClient(control) { client in
                try await ReplicaStub(wrapping: client).status(.init(), options: .timeout(seconds: 5))
            }
        }
    } catch let error as RPCError {
        throw CLIError(error.message)
    }
}

extension CallOptions {
    static func timeout(seconds: Int64) -> CallOptions {
        var options = CallOptions.defaults
        options.timeout = .seconds(seconds)
        return options
    }
}
