import ArgumentParser
import ControlAPI
import Daemons
import Foundation
import GRPCCore
import Logging
import NodeAgent
import Syscalls
import Volumes

struct NodeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node",
        abstract: "Nodes: the agent through which other nodes start and stop this node's engines, and the nodes this one knows.",
        subcommands: [Serve.self, Add.self, List.self, Remove.self, Health.self, StartEngine.self, StopEngine.self])

    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve this node's agent (gRPC): start, stop and list its engines, and its health.",
            discussion: """
                Engines it starts run as this node's daemons (keel-engine@ units under systemd, else \\
                processes of keel's own) and listen on the agent's host at the port the caller names. \\
                A device frontend whose engine is lost starts a new one through the next node's agent. \\
                Beyond loopback the agent needs --tls require with --tls-certificates (mutual TLS): the \\
                engines it starts then require TLS with the same credentials (device frontends hand the \\
                sessions to the kernel, kTLS); or --tls off (plaintext, logged as a warning), and its \\
                engines serve NBD without TLS on the node's address. Replicas it places serve plaintext.
                Example: keel node serve --listen 10.0.0.2:7800 --tls require --tls-certificates /var/lib/keel/tls/node-b
                """)

        @Option(help: "The agent's gRPC address, HOST:PORT (its host is also where engines listen).")
        var listen: String

        @Option(help: "The node's name (default: the hostname).")
        var name: String?

        @OptionGroup var node: NodeOptions

        @OptionGroup var serving: ServingOptions

        func run() throws {
            let logger = makeLogger(label: "keel.node", level: serving.logLevel)
            let address = try parseListenAddress(listen)
            guard case .tcp(let host, _) = address else {
                throw KeelError("--listen takes HOST:PORT: other nodes reach the agent, and its engines listen on HOST")
            }
            try serving.checkControlListener(address, logger: logger)
            let layout = node.layout
            for directory in [layout.stateDirectory, layout.runDirectory, layout.logDirectory] {
                do { try makeDirectories(directory, mode: 0o700) } catch { throw KeelError("\(error)") }
            }
            let loopback = Socket.isLoopbackOnly(address) ?? false
            let runner: any DaemonRunner & Sendable = systemdIsRunning()
                ? SystemdRunner(stateDirectory: layout.stateDirectory)
                : ProcessRunner(runDirectory: layout.runDirectory, logDirectory: layout.logDirectory)
            let plaintext = loopback ? [] : ["--tls", "off"]
            // An agent whose own API requires TLS has its engines and replicas require it too, with its
            // credentials: every link between nodes is TLS (device frontends hand theirs to the kernel, kTLS).
            let credentials = serving.tls == .require ? serving.certificatesDirectory : nil
            let listenerTLS = credentials.map { ["--tls", "require", "--tls-certificates", $0] }
            // Such engines' control APIs (unix sockets) require it as well: the agent's calls to them take its credentials.
            ControlTLS.useForCalls(credentials == nil ? .plaintext : serving.controlTLS)
            let settings = NodeAgentService.Settings(
                name: name ?? thisNodeName, host: host, layout: layout, version: keelVersion,
                engineListenerArguments: listenerTLS.map { $0 + ["--replica-tls", "require"] } ?? plaintext,
                replicaListenerArguments: listenerTLS ?? plaintext)
            TerminationSignals.block()
            let server = try ControlServer(address: address, tls: serving.controlTLS,
                                           services: [NodeAgentService(settings: settings, runner: runner)])
            logger.notice("serving the agent of node \(settings.name) on \(address), state \(layout.stateDirectory)")
            ServiceManager.notify("READY=1\nSTATUS=node \(settings.name) on \(address)")
            let signal = TerminationSignals.wait()
            logger.notice("signal \(signal): the agent stops; the engines it started run on")
            ServiceManager.notify("STOPPING=1")
            server.stop()
        }
    }

    struct Health: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Ask a node's agent for its name, version, load and daemons.",
            discussion: "Example: keel node health 10.0.0.2:7800")

        @Argument(help: "The agent's address, HOST:PORT.")
        var address: String

        @Flag(help: "Print JSON.")
        var json = false

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            control.apply()
            let health = try callNode(address, doing: "report its health") { try await $0.health(.init(), options: .timeout(seconds: 10)) }
            if json {
                return try printJSON(["name": health.name, "version": health.version, "load_average": health.loadAverage,
                                      "daemons": health.daemons.map { ["kind": $0.kind, "instance": $0.instance, "running": $0.running] }]
                                     as [String: Any])
            }
            print("node \(health.name): keel \(health.version), load \(String(format: "%.2f", health.loadAverage))")
            for daemon in health.daemons {
                print("  \(daemon.kind) \(daemon.instance): \(daemon.running ? "running" : "stopped")")
            }
        }
    }

    struct StartEngine: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "start-engine",
            abstract: "Have a node's agent start a volume's engine there; prints its NBD address once it serves.",
            discussion: """
                The engine claims the replicas with a newer epoch, which fences any engine that had them.
                Example: keel node start-engine 10.0.0.2:7800 --volume db --size 10G --port 10809 \\
                           --replica 10.0.0.3:7001 --replica 10.0.0.4:7001
                """)

        @Argument(help: "The agent's address, HOST:PORT.")
        var address: String

        @Option(help: "The volume's name.")
        var volume: String

        @Option(help: "The volume's size, e.g. 10G.")
        var size: ByteCount

        @Option(name: .customLong("replica"), help: "A replica's data address, as the engine takes it (repeat for each).")
        var replicas: [String] = []

        @Option(help: "The port the engine listens on, on the node's address.")
        var port: UInt16 = 10809

        @Option(help: "The volume's identity (keel volume create mints one).")
        var volumeID: String = ""

        @Flag(help: "Kill a running engine and start it again (its clients get no answer from it). One whose control API does not answer is restarted anyway.")
        var restartRunning = false

        @Flag(help: "Print JSON.")
        var json = false

        @OptionGroup var control: ControlClientOptions

        func validate() throws {
            guard !replicas.isEmpty else { throw ValidationError("give the volume's replicas: --replica ADDR for each") }
            guard port > 0 else { throw ValidationError("--port must be a TCP port, 1 to 65535") }
        }

        func run() throws {
            control.apply()
            let request = Keel_Control_V1_StartEngineRequest.with {
                $0.volume = volume
                $0.volumeID = volumeID
                $0.size = size.bytes
                $0.replicas = replicas
                $0.port = UInt32(port)
                $0.restartRunning = restartRunning
            }
            let started = try callNode(address, doing: "start the engine of \(volume)") {
                try await $0.startEngine(request, options: .timeout(seconds: 150))
            }
            if json {
                return try printJSON(["address": started.address, "epoch": started.epoch, "already_running": started.alreadyRunning] as [String: Any])
            }
            print(started.address)
        }
    }

    struct StopEngine: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "stop-engine",
            abstract: "Have a node's agent stop a volume's engine there (its clients' requests in flight finish first).",
            discussion: "Example: keel node stop-engine 10.0.0.2:7800 --volume db")

        @Argument(help: "The agent's address, HOST:PORT.")
        var address: String

        @Option(help: "The volume's name.")
        var volume: String

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            control.apply()
            _ = try callNode(address, doing: "stop the engine of \(volume)") {
                try await $0.stopEngine(.with { $0.volume = volume }, options: .timeout(seconds: 150))
            }
            print("engine of \(volume) stopped on \(address)")
        }
    }
}
