import ControlAPI
import ArgumentParser
import LibNBD
import Logging
import NBDProtocol
import NBDServer
import NodeRegistry
import ReplicaIdentity
import SnapshotExport
import Syscalls
import Volumes

extension Snapshot {
    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve a volume as of a snapshot over NBD, read-only, until SIGINT/SIGTERM.",
            discussion: """
                Reads come from the volume's replicas without claiming them, so the volume may be \
                attached, detached or have its frontend disabled. The export offers base:allocation and, \
                for one older snapshot OLDER (--changed-since, default the one just before), the context \
                keel:changed:OLDER: the 4 KiB blocks written, trimmed or zeroed since OLDER (flag 1: changed).
                Examples: keel snapshot export db nightly-2 --listen 127.0.0.1:10810
                          nbdinfo --map=keel:changed:nightly-1 nbd://127.0.0.1:10810
                """)

        @Argument(help: "The volume's name.")
        var volume: String

        @Argument(help: "The snapshot to serve.")
        var name: String

        @Option(help: "Where to listen: unix:/path/to.sock or HOST:PORT.")
        var listen: String

        @Option(name: .customLong("changed-since"), help: ArgumentHelp("The older snapshot whose changed-blocks view (keel:changed:OLDER) is served (default: the snapshot just before).", valueName: "older"))
        var changedSince: String?

        @Option(help: "The engine's control address, to learn the replicas from (default: this node's registry).")
        var engine: String?

        @Option(name: .customLong("replica"), help: "A replica's data address (repeat for each); instead of the registry or --engine.")
        var replicas: [String] = []

        @Option(help: "TLS on the links to the replicas: require (with --tls-certificates, or --tls-psk and --tls-username) or off.")
        var replicaTls: LinkTLSMode = .off

        @OptionGroup var serving: ServingOptions
        @OptionGroup var node: NodeOptions

        func validate() throws {
            guard SnapshotName.isValid(name) else {
                throw ValidationError("'\(name)' is not a snapshot name: use \(SnapshotName.rule)")
            }
        }

        func run() throws {
            let logger = makeLogger(label: "keel.snapshot-export", level: serving.logLevel)
            let address = try parseListenAddress(listen)
            try serving.refuseUnusedCredentials(links: replicaTls)
            LinkTLS.use(try serving.linkTLS(replicaTls))
            ControlTLS.useForCalls(serving.controlCallsTLS(replicaTls))
            try serving.checkNBDListener(address, logger: logger)
            let listenerTLS = try serving.serverTLS()
            let replicas = try replicaAddresses()
            TerminationSignals.block()
            let (reader, _) = try SnapshotReader.opening(volume: volume, snapshot: name, replicas: replicas, logger: logger) { older in
                guard let changedSince else { return older.last }
                guard older.contains(changedSince) else {
                    throw KeelError("snapshot \(changedSince) is not older than \(name) (older: \(older.isEmpty ? "none" : older.joined(separator: ", "))); see keel snapshot ls \(volume)")
                }
                return changedSince
            }
            let export = ExportDescription(name: name, description: "Keel snapshot \(name) of \(volume)", size: reader.size,
                                           readOnly: true, metaContexts: reader.changedContexts)
            let what = "snapshot \(name) of \(volume) (\(reader.size) bytes, read-only, from \(replicas.count) replica(s))"
            try serveUntilSignalled(reader, on: address, logger: logger, what: what) { listener in
                Server(device: reader, listener: listener, catalog: StaticExports([export]), tls: listenerTLS, threads: serving.threads,
                       logger: logger)
            }
        }

        private func replicaAddresses() throws -> [SocketAddress] {
            var texts = replicas
            if texts.isEmpty, let engine {
                let status = try callEngine(engine, doing: "report its replicas") { try await $0.status(.init()) }
                texts = status.replicas.map(\.address)
            } else if texts.isEmpty {
                texts = try Node(node).volume(volume).replicas.map(\.address)
            }
            guard !texts.isEmpty else { throw KeelError("volume \(volume) has no replica to read snapshot \(name) from") }
            return try texts.map { try parseListenAddress($0, option: "--replica") }
        }
    }
}
