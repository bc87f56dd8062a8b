import ArgumentParser
import Foundation
import NodeRegistry
import Volumes

struct Volume: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Volumes of this node by name: create, attach as /dev/nbdX and /dev/keel/NAME, detach, remove.",
        discussion: """
            The node registry (SQLite) lives in the state directory. When PID 1 is systemd the daemons \
            are units (keel-replica@, keel-engine@; install them with scripts/install), otherwise keel \
            runs them itself as processes tracked by pid files.
            """,
        subcommands: [Create.self, List.self, Show.self, Attach.self, Detach.self, Move.self, Remove.self])

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

        @Option(name: .customLong("replica-node"), help: ArgumentHelp("A node to place one of the replicas on, by the name 'keel node add' gave it: its agent starts the replica there (repeat for each; the replicas beyond those named go on this host).", valueName: "name"))
        var replicaNodes: [String] = []

        @Option(name: .customLong("engine-node"), help: ArgumentHelp("A node the engine may run on, by the name 'keel node add' gave it (repeat, in order of preference; default: this host). The device frontend on this host has the first that answers start it, and fails it over to the next when its node is lost.", valueName: "name"))
        var engineNodes: [String] = []

        @Flag(help: "Print the volume as JSON.")
        var json = false

        @OptionGroup var node: NodeOptions

        @OptionGroup var control: ControlClientOptions

        var spec: VolumeSpec {
            VolumeSpec(name: name, size: size.bytes, replicas: replicaAddresses.isEmpty ? replicas : replicaAddresses.count,
                       replicaAddresses: replicaAddresses, replicaNodes: replicaNodes, engineNodes: engineNodes,
                       connections: connections)
        }

        func validate() throws {
            guard (1...16).contains(replicas) else { throw ValidationError("a volume has 1 to 16 replicas") }
            if let problem = spec.problem(layout: node.layout) { throw ValidationError(problem) }
        }

        func run() throws {
            let node = try Node(self.node)
            let record = try node.createVolume(spec, credentials: control.credentials)
            if json {
                try printJSON(VolumeReport(record, node: node).json)
            } else if record.enginePlacedElsewhere {
                print("volume \(name): \(humanSize(record.size)), \(record.replicas.count) replica(s), engine on "
                    + record.engineNodes.joined(separator: " or ") + "; attach it with 'keel volume attach \(name)'")
            } else {
                let local = record.replicas.filter(\.isLocal).count
                print("volume \(name): \(humanSize(record.size)), \(record.replicas.count) replica(s)"
                    + (local > 0 ? " on this node" : "") + ", run by \(record.runner.rawValue); attach it with 'keel volume attach \(name)'")
            }
        }
    }
}
