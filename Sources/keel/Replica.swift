import ArgumentParser
import ControlAPI
import FileExport
import Logging
import NBDServer
import ReplicaServer
import ReplicaStore
import Syscalls
#if canImport(Glibc)
import Glibc
import Volumes
#endif

struct Replica: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Replica processes: hold a volume's data for its engine.",
        subcommands: [Serve.self, Add.self, Remove.self])

    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve a replica's data over NBD to the engine holding the newest epoch.",
            discussion: """
                Creates the replica in DIR on first start (--size is required then) and
                reopens it afterwards. Engines open the export '<volume>@<epoch>'; a newer
                epoch claims the replica (persisted before the answer), older ones are refused.
                Example: keel replica serve --dir /var/lib/keel/r1 --listen 127.0.0.1:7001 --size 10G
                """)

        @Option(help: "The replica's data directory.")
        var dir: String

        @Option(help: "Data (NBD) address: HOST:PORT or unix:/path.")
        var listen: String

        @Option(help: "Control API (gRPC) address: HOST:PORT or unix:/path (default: data port + 1, or <socket>.control).")
        var control: String?

        @Option(help: "Size of a new replica, e.g. 10G (binary units); must match an existing one.")
        var size: ByteCount?

        @Option(help: ArgumentHelp("CPU scheduling of the replica's threads: batch (a request's wakeup does not preempt the engine or another replica sharing the cores; they are served in batches) or normal.", valueName: "policy"))
        var scheduling: SchedulingPolicy = .batch

        @OptionGroup var serving: ServingOptions

        func run() throws {
            let logger = makeLogger(label: "keel.replica", level: serving.logLevel)
            do { try scheduling.applyToThisThread() } catch {
                logger.warning("\(error): the replica's threads keep the normal policy")
            }
            let address = try parseListenAddress(listen)
            let controlAddress = try control.map { try parseListenAddress($0, option: "--control") }
                ?? defaultControlAddress(forData: address)
            try serving.refuseUnusedCredentials()
            try serving.checkNBDListener(address, logger: logger)
            try serving.checkControlListener(controlAddress, logger: logger)
            let listenerTLS = try serving.serverTLS()
            TerminationSignals.block()
            let store: ReplicaStore
            let chain: LayerChain
            do {
                store = try ReplicaStore.open(directory: dir, size: size?.bytes)
                chain = try LayerChain(size: store.size, layers: try store.chain().map { ($0.id, $0.files) }, logger: logger)
            } catch {
                throw KeelError("\(error)")
            }
            let device = ReplicaDevice(store: store, chain: chain)
            let controlServer = try ControlServer(address: controlAddress, tls: serving.controlTLS,
                                                  services: [ReplicaControlService(device: device, logger: logger)])
            defer { controlServer.stop() }
            let what = "replica \(store.id) in \(dir) (\(store.size) bytes, epoch \(store.epoch)), control on \(controlAddress)"
            try serveUntilSignalled(device, on: address, logger: logger, what: what) { listener in
                Server(device: device, listener: listener, catalog: device.catalog(logger: logger), tls: listenerTLS,
                       threads: serving.threads, logger: logger)
            }
        }
    }
}
