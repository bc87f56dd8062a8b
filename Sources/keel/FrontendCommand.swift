import ArgumentParser
import DeviceFrontend
import Foundation
import Logging
import NodeRegistry
import Syscalls
import TLSSession
import Volumes

struct FrontendCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "frontend",
        abstract: "The host's device of a volume (/dev/nbdX), held connected to the volume's engine wherever it runs.",
        discussion: "keel volume attach starts one per attached volume (keel-frontend@VOLUME under systemd).",
        subcommands: [Serve.self, Hold.self, Switch.self, Resume.self])

    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Hold /dev/nbdX connected to a volume's engine (local or on another node); prints the device.",
            discussion: """
                Connects --connections sockets to the engine, negotiates each (NBD, export = the volume) and \
                hands them to the kernel. When the kernel gives up on a connection (the engine died, its link \
                was cut, a request outlived --io-timeout) it gets a new one; while the engine does not answer \
                the kernel holds the device's I/O for --dead-connection-timeout seconds and the frontend keeps \
                trying. SIGTERM drains the I/O in flight and detaches the device.
                Example: keel frontend serve --volume db --engine 10.0.0.2:7900
                """)

        @Option(help: "The volume's name: the engine's export, and /dev/keel/NAME.")
        var volume: String

        @Option(help: "The engine's NBD address: unix:/path or HOST:PORT (default, with --engine-node: an engine the first node that answers starts).")
        var engine: String?

        @Option(help: "With --engine-node and no --engine: the volume's size, for the engine a node agent starts.")
        var size: ByteCount?

        @Option(help: "The device to attach, /dev/nbdN (default: a free one the kernel picks).")
        var device: String?

        @Option(help: "Connections of the device (fixed for its life).")
        var connections: Int = 2

        @Option(help: "Seconds the kernel lets a request run before it gives up on its connection and retries the request on another.")
        var ioTimeout: UInt64 = 30

        @Option(help: "Seconds the device holds I/O while no connection is alive (then it fails I/O).")
        var deadConnectionTimeout: UInt64 = 120

        @Option(help: "Seconds a connection to the engine and its handshake may take.")
        var connectTimeout: Double = 3

        @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
        var logLevel: Logger.Level = .notice

        @Option(help: ArgumentHelp("A node agent that may run the volume's engine (repeat, in order of preference): when the engine stops answering, the frontend has the node it ran on restart it, or the next node that answers start a new one.", valueName: "host:port"))
        var engineNode: [String] = []

        @Option(name: .customLong("replica"), help: "With --engine-node: a replica's data address, as the engine takes it (repeat for each).")
        var replicas: [String] = []

        @Option(help: "With --engine-node: the volume's identity (keel volume create mints one).")
        var volumeID: String = ""

        @Option(help: "With --engine-node: the port an engine started by a node agent listens on, on that node's address.")
        var enginePort: UInt16 = 10809

        @Option(help: "With --engine-node: the --replica-timeout of engines started by node agents (0: the engine's default).")
        var replicaTimeout: Double = 0

        @Option(help: "A file to keep the device's state in, as JSON (engine, connected or waiting, the last failure): what keel volume show reads.")
        var statusFile: String?

        @Option(help: ArgumentHelp("TLS on the device's links to an engine over TCP: require (STARTTLS with the node's client certificate, then the kernel holds the session: kTLS) or off. Default: require when the node has credentials (--tls-certificates, $KEEL_TLS_CERTIFICATES, or STATE/tls/NAME), else off. Links over unix sockets stay plaintext.", valueName: "mode"))
        var linkTls: LinkTLSMode?

        @Flag(help: "The engine at --engine is this node's engine daemon of the volume (keel volume attach started it): when it stops answering, the frontend starts it again, the only one that does.")
        var restartEngine = false

        @Flag(help: "With --engine-node: take part in this node's migrations of the volume (keel migrate, its registry in --state-dir): when the engine is lost while a migration's engine B stands by, B takes over.")
        var migrations = false

        @Flag(help: "Put a device-mapper linear device, /dev/mapper/keel-VOLUME, over /dev/nbdX, and print it: mounted instead of /dev/nbdX, its I/O can be held while the volume's engine switches (keel frontend hold, switch).")
        var mapper = false

        @Option(name: .customLong("control"), help: "Control API (gRPC) address HOST:PORT or unix:/path, for engine switches (default: none).")
        var controlAddress: String?

        @OptionGroup var node: NodeOptions

        @OptionGroup var control: ControlClientOptions

        func validate() throws {
            if let problem = VolumeRecord.validate(name: volume) {
                throw ValidationError("--volume: \(problem) (it names /dev/keel/<volume>)")
            }
            try validateDevice(device)
            guard (1...16).contains(connections) else { throw ValidationError("--connections must be between 1 and 16") }
            guard ioTimeout >= 1, deadConnectionTimeout >= 1 else {
                throw ValidationError("--io-timeout and --dead-connection-timeout must be at least 1 second")
            }
            guard connectTimeout >= 0.1 && connectTimeout <= 600 else {
                throw ValidationError("--connect-timeout must be between 0.1 and 600 seconds")
            }
            if engine == nil && (engineNode.isEmpty || size == nil) {
                throw ValidationError("give the engine's address (--engine ADDR), or --engine-node with --size and --replica to have a node start one")
            }
            if migrations && engineNode.isEmpty {
                throw ValidationError("--migrations is for engines on engine nodes (--engine-node); this node's engine takes part with --restart-engine")
            }
            if restartEngine && (engine == nil || !engineNode.isEmpty) {
                throw ValidationError("--restart-engine is for this node's engine at --engine; with --engine-node the node agents restart it")
            }
            if !engineNode.isEmpty && replicas.isEmpty {
                throw ValidationError("--engine-node needs the volume's replicas (--replica ADDR for each) to start an engine elsewhere")
            }
        }

        func run() throws {
            let logger = makeLogger(label: "keel.frontend", level: logLevel)
            TerminationSignals.block()
            let settings = KernelDevice.Settings(volume: volume, connections: connections, ioTimeout: ioTimeout,
                                                 deadConnectionTimeout: deadConnectionTimeout,
                                                 device: device.flatMap(deviceIndex))
            for node in engineNode { _ = try parseListenAddress(node, option: "--engine-node") }
            control.apply()
            let failover = try places().map { places in
                EngineFailover(places: places,
                               spec: .init(volume: volume, volumeID: volumeID, size: size?.bytes ?? 0, replicas: replicas,
                                           port: UInt32(enginePort), replicaTimeout: replicaTimeout),
                               hungAfter: max(5, 2 * connectTimeout), logger: logger,
                               standbyTakesOver: try migrationHook())
            }
            let endpoint: EngineEndpoint
            if let engine {
                endpoint = EngineEndpoint(address: try parseListenAddress(engine, option: "--engine"), exportName: volume)
            } else if let started = failover?.engine(replacing: nil) {
                endpoint = started
            } else {
                throw KeelError("no engine node could start the engine of \(volume) (\(engineNode.joined(separator: ", "))); see the log")
            }
            let tls = try linkCredentials()
            let controlListen = try controlAddress.map { try parseListenAddress($0, option: "--control") }
            let frontend: DeviceFrontend
            let path: String
            do {
                frontend = DeviceFrontend(device: try KernelDevice(settings: settings, logger: logger), engine: endpoint,
                                          connectTimeout: Int32(connectTimeout * 1000), tls: tls,
                                          mapperName: mapper ? Node.mapperName(volume) : nil, logger: logger,
                                          replacement: failover.map { failover in { @Sendable in failover.engine(replacing: $0, failure: $1) } },
                                          observer: { @Sendable status in
                                              if case .connected = status { failover?.engineAnswered() }
                                              if let statusFile { Self.record(status, in: statusFile, logger: logger) }
                                          })
                path = try frontend.start()
            } catch {
                throw KeelError("cannot attach volume \(volume) from engine \(endpoint): \(error)")
            }
            failover?.deviceAttached(size: frontend.size)
            let controlServer: ControlServer?
            do {
                controlServer = try controlListen.map {
                    try ControlServer(address: $0, services: [FrontendControlService(frontend: frontend)])
                }
            } catch {
                frontend.stop()
                throw error
            }
            defer { controlServer?.stop() }
            print(path)
            fflush(stdout)
            ServiceManager.notify("READY=1\nSTATUS=\(path) connected to engine \(endpoint)")
            let signal = TerminationSignals.wait()
            logger.notice("signal \(signal): draining and detaching \(path)")
            ServiceManager.notify("STOPPING=1")
            failover?.cancel()
            frontend.stop()
            if let statusFile { unlink(statusFile) }
        }

        /// The client credentials of TLS links, or nil for plaintext ones.
        private func linkCredentials() throws -> TLSCredentials? {
            let directory = control.tlsCertificates ?? ProcessInfo.processInfo.environment["KEEL_TLS_CERTIFICATES"]
                ?? nodeCredentialsDirectory()
            guard (linkTls ?? (directory == nil ? .off : .require)) == .require else { return nil }
            guard let directory else {
                throw KeelError("--link-tls require needs the node's client certificate: --tls-certificates DIR (from 'keel cert issue'), or STATE/tls/NAME")
            }
            do { return try TLSCredentials.certificates(directory: directory, role: .client) } catch {
                throw KeelError("TLS credentials for the device's links: \(error)")
            }
        }

        /// Where the frontend has engines started: the engine nodes' agents, or this node's own engine daemon.
        private func places() throws -> [any EnginePlace]? {
            if !engineNode.isEmpty { return engineNode.map(AgentPlace.init(address:)) }
            guard restartEngine, let engine else { return nil }
            let thisNode = try Node(node)
            let record = try thisNode.volume(volume)
            let socket = thisNode.layout.engineSocket(volume)
            guard "unix:" + socket == engine else {
                throw KeelError("--restart-engine: the engine of \(volume) on this node listens on unix:\(socket), not \(engine)")
            }
            return [LocalPlace(runner: thisNode.runner(record.runner),
                               engine: (try? thisNode.volume(volume)).map(thisNode.engineDaemon) ?? thisNode.engineDaemon(record),
                               socket: socket, control: thisNode.layout.engineControl(volume),
                               standbyTakesOver: { [volume] in EngineMigration(node: thisNode, volume: volume).takeOverAfterLoss() != nil })]
        }

        /// With --migrations: a migration's engine B on an engine node takes over from a lost engine.
        private func migrationHook() throws -> (@Sendable () -> String?)? {
            guard migrations else { return nil }
            let thisNode = try Node(node)
            return { [volume] in EngineMigration(node: thisNode, volume: volume).takeOverAfterLoss() }
        }

        private static func record(_ status: DeviceFrontend.Status, in file: String, logger: Logger) {
            do { try FrontendStatusFile(status).write(file) } catch {
                logger.warning("cannot write the device's state to \(file): \(error)")
            }
        }
    }
}
extension FrontendCommand {
    struct Hold: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Hold a device's I/O for an engine switch (its device-mapper device suspended).",
            discussion: """
                Returns once the I/O in flight is answered; the hold ends with 'keel frontend switch' or \
                'keel frontend resume', or by itself after --seconds (keel migrate confirm does all of it).
                Example: keel frontend hold --frontend unix:/run/keel/db.frontend.control
                """)

        @Option(help: "The device frontend's control address (its --control).")
        var frontend: String

        @Option(help: "Seconds at most the I/O stays held.")
        var seconds: Double = 10

        @OptionGroup var control: ControlClientOptions

        func validate() throws {
            guard seconds > 0 && seconds <= 600 else { throw ValidationError("--seconds must be above 0 and at most 600") }
        }

        func run() throws {
            control.apply()
            let held = try callFrontend(frontend, doing: "hold the device's I/O") { [seconds] in
                try await $0.hold(.with { $0.holdSeconds = seconds })
            }
            print("I/O held (in flight answered in \(milliseconds(held.drainedMicroseconds)) ms, \(held.inFlight) left); "
                  + "switch or resume within \(Int(seconds)) s")
        }
    }

    struct Switch: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Connect a held device to another engine, then let its I/O go on.",
            discussion: "Example: keel frontend switch --frontend unix:/run/keel/db.frontend.control --engine unix:/run/keel/db.b.sock")

        @Option(help: "The device frontend's control address (its --control).")
        var frontend: String

        @Option(help: "The new engine's NBD address: unix:/path or HOST:PORT.")
        var engine: String

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            control.apply()
            let released = try callFrontend(frontend, doing: "switch engines") { [engine] in
                try await $0.switchEngine(.with { $0.engine = engine })
            }
            print("device connected to engine \(released.engine); I/O was held \(milliseconds(released.heldMicroseconds)) ms")
        }
    }

    struct Resume: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Let a held device's I/O go on with the engine it has (a switch given up).")

        @Option(help: "The device frontend's control address (its --control).")
        var frontend: String

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            control.apply()
            let released = try callFrontend(frontend, doing: "resume the device's I/O") { try await $0.resume(.init()) }
            print("I/O goes on with engine \(released.engine); it was held \(milliseconds(released.heldMicroseconds)) ms")
        }
    }
}

private func milliseconds(_ microseconds: UInt64) -> String { String(format: "%.1f", Double(microseconds) / 1000) }
