import ControlAPI
import ArgumentParser
import Engine
import NBDProtocol
import LibNBD
import Logging
import NodeRegistry
import NBDServer
import Syscalls
#if canImport(Glibc)
import Glibc
import Volumes
#endif

struct EngineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "engine",
        abstract: "Volume engines: serve a volume, replicated to its replicas.",
        subcommands: [Serve.self, Activate.self])

    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve a volume over NBD, every write replicated synchronously to all healthy replicas.",
            discussion: """
                Claims every replica with an epoch newer than any of them has seen (or --epoch),
                which fences off any engine that had them before. The engine is a plain NBD target: the
                host's device (/dev/nbdX) is held by `keel frontend serve`, on this node or another.
                Example: keel engine serve --volume vol1 --size 10G --replica 127.0.0.1:7001 \\
                           --replica 127.0.0.1:7002 --replica 127.0.0.1:7003 --listen unix:/run/keel/vol1.sock
                """)

        @Option(help: "The volume's name: its export name on the frontend.")
        var volume: String

        @Option(help: "The volume's identity (keel volume create mints one): a replica that belongs to another volume refuses this engine.")
        var volumeID: String = ""

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

        @Flag(help: "Start even if replicas that may hold the newest data cannot be reached (a majority must be).")
        var allowDegraded = false

        @Option(help: "TLS on the links to the replicas: require (with --tls-certificates, or --tls-psk and --tls-username) or off.")
        var replicaTls: LinkTLSMode = .off

        @Flag(help: "Stand by (a migration's new engine): open sessions to every replica that claim nothing, then wait for the control API's Activate to claim them and serve. Needs --control.")
        var standby = false

        @OptionGroup var serving: ServingOptions

        func validate() throws {
            guard !replicas.isEmpty else { throw ValidationError("give at least one --replica HOST:PORT") }
            guard !standby || control != nil else {
                throw ValidationError("--standby waits for the control API's Activate: give --control HOST:PORT")
            }
            guard !standby || epoch == nil else {
                throw ValidationError("--standby picks its epoch (one more than the replicas have seen); leave out --epoch")
            }
            guard replicaTimeout >= 0.1 && replicaTimeout <= 3600 else {
                throw ValidationError("--replica-timeout must be between 0.1 and 3600 seconds")
            }
            if let problem = VolumeRecord.validate(name: volume) {
                throw ValidationError("--volume: \(problem) (it names /dev/keel/<volume>)")
            }
            guard volumeID.count <= 64, volumeID.allSatisfy({ $0.isASCII && ($0.isHexDigit || $0 == "-") }) else {
                throw ValidationError("--volume-id takes a UUID (hex digits and '-'), not '\(volumeID)'")
            }
        }

        func run() throws {
            let logger = makeLogger(label: "keel.engine", level: serving.logLevel)
            // A mistyped KEEL_FAULTS stops the start here, not half way through a claim.
            _ = FaultPoints.fromEnvironment
            let address = try parseListenAddress(listen)
            let addresses = try replicas.map { try parseListenAddress($0, option: "--replica") }
            let controlAddress = try control.map { try parseListenAddress($0, option: "--control") }
            try serving.refuseUnusedCredentials(links: replicaTls)
            LinkTLS.use(try serving.linkTLS(replicaTls))
            ControlTLS.useForCalls(serving.controlCallsTLS(replicaTls))
            try serving.checkNBDListener(address, logger: logger)
            if let controlAddress { try serving.checkControlListener(controlAddress, logger: logger) }
            let listenerTLS = try serving.serverTLS()
            TerminationSignals.block()

            // Everything that can refuse the start comes before the first claim:
            // a refused start must not fence the engine that runs now.
            let listener = try bindListener(address)
            let names = SocketNames(listen: address.unixPath, control: controlAddress?.unixPath)
            let engine = EngineReference(names: names)
            let controlServer: ControlServer?
            do {
                controlServer = try controlAddress.map {
                    try ControlServer(address: $0, tls: serving.controlTLS,
                                      services: [EngineControlService(engine: engine)], pathAtStop: { names.control })
                }
            } catch {
                listener.close()
                throw error
            }
            defer { controlServer?.stop() }

            let engineID = String(UInt64.random(in: 1...UInt64.max), radix: 16)
            let startup = VolumeStartup(volume: volume, volumeID: volumeID, size: size.bytes, engineID: engineID,
                                        replicaTimeoutSeconds: replicaTimeout, allowDegraded: allowDegraded,
                                        logger: logger)
            let outcome: VolumeStartup.Outcome
            var standbyLinks: [(SocketAddress, NBDClient)] = []
            do {
                if standby {
                    guard let started = try standBy(startup, addresses: addresses, engine: engine, logger: logger) else {
                        listener.close()
                        return
                    }
                    (outcome, standbyLinks) = started
                } else {
                    outcome = try startup.run(addresses: addresses, epoch: epoch)
                }
            } catch {
                engine.failed("\(error)")
                listener.close()
                throw KeelError("\(error)")
            }
            let device = EngineDevice(volume: volume, volumeID: volumeID, size: size.bytes, epoch: outcome.epoch, engineID: engineID,
                                      replicas: outcome.replicas, gate: WriteGate(size: size.bytes),
                                      replicaTimeoutSeconds: replicaTimeout, logger: logger)
            device.adopt(standbyLinks)
            try device.startKeeper()
            defer {
                // No control call (replica add or rm) may race the keeper's final clear.
                controlServer?.stop()
                device.stopKeeper()
            }
            let what = "volume \(volume) (\(size.bytes) bytes) with \(addresses.count) replica(s), epoch \(outcome.epoch)"
            try serveUntilSignalled(device, on: address, listener: listener, logger: logger, what: what,
                                    afterStart: {
                                        // Control calls made during the start waited for this.
                                        engine.started(device, resyncedBytes: outcome.resyncedBytes)
                                    }, pathAtExit: { names.listen }) { listener in
                let export = ExportDescription(name: volume, size: device.size, readOnly: device.readOnly)
                return Server(device: device, listener: listener, catalog: EngineExports(device: device, export: export), tls: listenerTLS,
                              threads: serving.threads, logger: logger)
            }
        }
    }
}

extension EngineCommand {
    struct Activate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make a standing-by engine (keel engine serve --standby) take its volume over.",
            discussion: """
                It claims every replica with its standby sessions' epoch, which fences the engine that had
                them: quiesce that engine's clients first (keel migrate confirm does all of it).
                Example: keel engine activate --engine unix:/run/keel/db.b.control
                """)

        @Option(help: "The standing-by engine's control address, HOST:PORT or unix:/path (its --control).")
        var engine: String

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            control.apply()
            let activated = try callEngine(engine, doing: "take the volume over") { try await $0.activate(.init()) }
            let resynced = activated.resyncedBytes > 0 ? ", \(activated.resyncedBytes) bytes made identical between replicas" : ""
            print("engine at \(engine) serves the volume: epoch \(activated.epoch), "
                  + "activated in \(String(format: "%.1f", Double(activated.tookMicroseconds) / 1000)) ms\(resynced)")
        }
    }
}

extension EngineCommand.Serve {
    /// Opens standby sessions and waits for `Activate` (then claims and
    /// returns the start) or for SIGTERM (nil: nothing was claimed).
    func standBy(_ startup: VolumeStartup, addresses: [SocketAddress], engine: EngineReference,
                 logger: Logger) throws -> (VolumeStartup.Outcome, [(SocketAddress, NBDClient)])? {
        let standby = try StandbyStart(startup, addresses: addresses, threads: serving.threads)
        engine.standingBy(epoch: standby.epoch) { standby.lostReplicas().map { "\($0)" } }
        let what = "volume \(volume): sessions of epoch \(standby.epoch) open to \(standby.replicasReached) of \(addresses.count) replica(s)"
        logger.notice("standing by for \(what); nothing is claimed until Activate")
        ServiceManager.notify("READY=1\nSTATUS=standing by for \(what)")
        let faults = FaultPoints.fromEnvironment
        let dropLinksAt = faults.dropStandbyLinksAfter.map { monotonicSeconds() + $0 }
        func dropLinksNow() -> Bool {
            if let at = dropLinksAt, monotonicSeconds() >= at { return true }
            if let cue = faults.dropStandbyLinksWhen, access(cue, F_OK) == 0 { return true }
            return false
        }
        while !engine.waitForActivation(seconds: 0.1) {
            if dropLinksNow(), standby.lostReplicas().isEmpty {
                logger.warning("fault point drop-standby-links: every standby session shut down")
                standby.dropSessionsForTest()
            }
            if TerminationSignals.arePending {
                standby.close()
                logger.notice("stood down: nothing was claimed")
                return nil
            }
        }
        let asked = monotonicSeconds()
        let started = try standby.activate()
        logger.notice("activated: claimed epoch \(started.outcome.epoch) in \(Int((monotonicSeconds() - asked) * 1000)) ms")
        return started
    }
}

/// 3 for /dev/nbd3.
func deviceIndex(_ path: String) -> UInt32? {
    path.hasPrefix("/dev/nbd") ? UInt32(path.dropFirst("/dev/nbd".count)) : nil
}

func validateDevice(_ device: String?) throws {
    if let device, deviceIndex(device) == nil {
        throw ValidationError("--device takes a kernel NBD device such as /dev/nbd0, not '\(device)'")
    }
}
