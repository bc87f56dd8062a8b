import ArgumentParser
import Engine
import LibNBD
import Logging
import NBDServer
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

struct EngineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "engine",
        abstract: "Volume engines: serve a volume, replicated to its replicas.",
        subcommands: [Serve.self])

    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve a volume over NBD, every write replicated synchronously to all healthy replicas.",
            discussion: """
                Claims every replica with an epoch newer than any of them has seen (or --epoch),
                which fences off any engine that had them before.
                Example: keel engine serve --volume vol1 --size 10G --replica 127.0.0.1:7001 \\
                           --replica 127.0.0.1:7002 --replica 127.0.0.1:7003 --listen unix:/run/keel/vol1.sock
                """)

        @Option(help: "The volume's name: its export name on the frontend.")
        var volume: String

        @Option(help: "The volume's size, e.g. 10G; every replica must have it.")
        var size: ByteCount

        @Option(name: .customLong("replica"), help: "A replica's data address (repeat for each replica).")
        var replicas: [String] = []

        @Option(help: "Frontend address: unix:/path or HOST:PORT.")
        var listen: String

        @Option(help: "Control API (gRPC) address HOST:PORT, for `keel status` (default: none).")
        var control: String?

        @Option(help: "The epoch to claim the replicas with (default: one more than the newest they have seen).")
        var epoch: UInt64?

        @Option(help: "Seconds a replica may leave a request unanswered before it is failed (ERR).")
        var replicaTimeout: Double = 8

        @OptionGroup var serving: ServingOptions

        func validate() throws {
            guard !replicas.isEmpty else { throw ValidationError("give at least one --replica HOST:PORT") }
            guard replicaTimeout >= 0.1 && replicaTimeout <= 3600 else {
                throw ValidationError("--replica-timeout must be between 0.1 and 3600 seconds")
            }
            guard !volume.isEmpty, !volume.contains("@") else {
                throw ValidationError("--volume must be a non-empty name without '@'")
            }
        }

        func run() throws {
            let logger = makeLogger(label: "keel.engine", level: serving.logLevel)
            let address = try parseListenAddress(listen)
            let addresses = try replicas.map { try parseListenAddress($0, option: "--replica") }
            let controlAddress = try control.map { try parseListenAddress($0, option: "--control") }
            TerminationSignals.block()

            // Look first, claim after: a refused start must not fence the engine in charge.
            let newest = try addresses.map(inspect).max()!
            let claim = epoch ?? newest + 1
            for replica in addresses { try claimReplica(replica, epoch: claim) }

            let set = ReplicaSet(addresses: addresses, logger: logger)
            let device = EngineDevice(volume: volume, size: size.bytes, epoch: claim, replicas: set,
                                      replicaTimeoutSeconds: replicaTimeout, logger: logger)
            let what = "volume \(volume) (\(size.bytes) bytes) with \(addresses.count) replica(s), epoch \(claim)"
            let controlServer = try controlAddress.map {
                try ControlServer(address: $0, services: [EngineControlService(device: device)])
            }
            defer { controlServer?.stop() }
            try serveUntilSignalled(device, on: address, logger: logger, what: what) { listener in
                Server(device: device, listener: listener, exportName: volume, threads: serving.threads, logger: logger)
            }
        }

        /// The newest epoch a replica has seen (its export list shows `@<epoch>`),
        /// after checking, without claiming anything, that its size is the volume's.
        private func inspect(_ replica: SocketAddress) throws -> UInt64 {
            let probe: NBDClient
            let exports: [String]
            do {
                probe = try NBDClient()
                try probe.setOptionMode(true)
                try connect(probe, to: replica)
                exports = try probe.listExports()
            } catch {
                throw CLIError("cannot reach replica \(replica): \(error)")
            }
            guard exports.count == 1, exports[0].hasPrefix("@"), let epoch = UInt64(exports[0].dropFirst()) else {
                throw CLIError("\(replica) is not a Keel replica (it lists exports \(exports))")
            }
            let replicaSize: UInt64
            do {
                try probe.setExportName("\(volume)@\(epoch)")
                try probe.info()
                replicaSize = try probe.size
                try? probe.abortOptions()
            } catch {
                throw CLIError("cannot inspect replica \(replica): \(error)")
            }
            guard replicaSize == size.bytes else {
                throw CLIError("replica \(replica) holds \(replicaSize) bytes but the volume is \(size.bytes); nothing was changed")
            }
            return epoch
        }

        private func claimReplica(_ replica: SocketAddress, epoch: UInt64) throws {
            let client = try NBDClient()
            try client.setExportName("\(volume)@\(epoch)")
            do { try connect(client, to: replica) } catch {
                throw CLIError("replica \(replica) refused epoch \(epoch): \(error)")
            }
            try? client.shutdown()
        }

        private func connect(_ client: NBDClient, to address: SocketAddress) throws {
            switch address {
            case .unix(let path): try client.connect(unixSocket: path)
            case .tcp(let host, let port): try client.connect(host: host, port: port)
            }
        }
    }
}
