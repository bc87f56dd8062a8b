import ArgumentParser
import ControlAPI
import Daemons
import Foundation
import KernelNBD
import NodeRegistry
import Syscalls

extension Volume {
    struct Attach: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Attach a volume to this host: prints /dev/nbdX and /dev/keel/NAME.",
            discussion: """
                Starts the volume's local replicas and its engine if they are not running, then its \
                device frontend (keel frontend serve), which holds /dev/nbdX connected to the engine. \
                A device the volume is still attached to while no engine serves it (the engine died) \
                gets the new engine without I/O errors. Refused while a live engine elsewhere is \
                connected to the volume's replicas, unless --force.
                Example: keel volume attach db && mkfs.ext4 /dev/keel/db
                """)

        @OptionGroup var target: VolumeTarget

        @Option(help: "The device to attach, /dev/nbdN (default: a free one the kernel picks).")
        var device: String?

        @Flag(help: "Take the volume over from an engine elsewhere that is still connected to its replicas.")
        var force = false

        @Option(help: "Seconds to wait for the engine to serve and the device to be attached.")
        var timeout: Double = 120

        func validate() throws { try validateDevice(device) }

        func run() throws {
            let node = try Node(target.node)
            try node.lock(target.name)
            let volume = try node.volume(target.name)
            let runner = node.runner(volume.runner)
            let engine = node.engineDaemon(volume)
            let frontend = node.frontendDaemon(volume, device: device)
            let attachment = node.attachment(volume)
            if attachment.engineRunning, attachment.frontendRunning, let device = attachment.device {
                throw CLIError("volume \(target.name) is already attached as \(device)")
            }
            try node.startReplicas(volume)
            // An engine elsewhere is the frontend's to start: on the first engine node that answers.
            let localEngine = !volume.enginePlacedElsewhere
            if localEngine && !attachment.engineRunning && !force { try checkNoLiveEngine(volume) }
            do { _ = try KernelNBD() } catch { throw CLIError("\(error)") }

            let deadline = Date().addingTimeInterval(timeout)
            if localEngine && !attachment.engineRunning {
                try start(engine, runner: runner)
                do { try waitForEngine(engine, runner: runner, node: node, before: deadline) } catch {
                    try? runner.stop(engine)
                    throw error
                }
            }
            let device: String
            do {
                // A frontend that holds the device already reconnects it to the new engine by itself.
                if !attachment.frontendRunning { try start(frontend, runner: runner) }
                device = try waitForDevice(frontend, runner: runner, before: deadline)
            } catch {
                // Nothing half-attached: what this command started goes, and is not restarted.
                if !attachment.frontendRunning { try? runner.stop(frontend) }
                if localEngine && !attachment.engineRunning { try? runner.stop(engine) }
                throw error
            }
            let link = waitForLink(device)
            if target.json { return try printJSON(["volume": target.name, "device": device, "link": link ?? NSNull()] as [String: Any]) }
            print(device)
            if let link { print(link) } else {
                fputs("keel: no /dev/keel/\(target.name): udev is not running or Keel's rule is not installed (Udev/60-keel.rules)\n", stderr)
            }
        }

        private func start(_ daemon: Daemon, runner: DaemonRunner) throws {
            do { try runner.start(daemon) } catch {
                // Under systemd the unit may be enabled already: it must not retry (or come back at boot).
                let reason = runner.lastFailure(daemon) ?? "\(error)"
                try? runner.stop(daemon)
                throw CLIError("cannot attach \(target.name): \(reason)")
            }
        }

        /// A replica with open connections of its owner's epoch is in use by a live engine.
        private func checkNoLiveEngine(_ volume: VolumeRecord) throws {
            for replica in volume.replicas {
                guard let address = try? Syscalls.SocketAddress(parsing: replica.address),
                      let status = try? replicaStatus(defaultControlAddress(forData: address)),
                      status.engineConnections > 0 else { continue }
                throw CLIError("volume \(target.name) is attached elsewhere: engine \(status.owner.engine) (epoch \(status.owner.epoch)) "
                    + "is connected to replica \(replica.address); detach it there first, or pass --force to take it over")
            }
        }

        /// Until the engine has claimed its replicas and serves (its control API answers).
        private func waitForEngine(_ engine: Daemon, runner: DaemonRunner, node: Node, before deadline: Date) throws {
            while Date() < deadline {
                try checkStillRunning(engine, runner: runner)
                if (try? callEngine(node.engineControl(target.name), doing: "report its status", {
                    try await $0.status(.init())
                })) != nil { return }
                usleep(100_000)
            }
            throw CLIError("the engine of \(target.name) did not serve within \(Int(timeout)) s; see its log")
        }

        /// Until the kernel shows a device with the volume's backend identifier and its size.
        private func waitForDevice(_ frontend: Daemon, runner: DaemonRunner, before deadline: Date) throws -> String {
            while Date() < deadline {
                try checkStillRunning(frontend, runner: runner)
                if let index = KernelNBD.devices(withBackend: "keel:\(target.name)").first,
                   let size = readSmallFile("/sys/block/nbd\(index)/size", limit: 64), size != "0\n" {
                    return "/dev/nbd\(index)"
                }
                usleep(100_000)
            }
            throw CLIError("the device frontend of \(target.name) did not attach a device within \(Int(timeout)) s; see its log")
        }

        private func checkStillRunning(_ daemon: Daemon, runner: DaemonRunner) throws {
            guard !runner.isRunning(daemon) else { return }
            throw CLIError(runner.lastFailure(daemon).map { "cannot attach \(target.name): \($0)" }
                ?? "the \(daemon.description) stopped before the device was attached; see its log")
        }

        /// udev makes the link from the device's change event. The kernel sends
        /// that event as the device gets its size, a moment before the backend
        /// identifier is there, so udev may have found none. Once the identifier
        /// is there, a change event of our own that udev has processed (its
        /// answer on the netlink, not a timer) leaves the link made, however
        /// busy the host.
        private func waitForLink(_ device: String) -> String? {
            let link = "/dev/keel/\(target.name)"
            let made = { access(link, F_OK) == 0 }
            guard access("/run/udev/control", F_OK) == 0 else { return made() ? link : nil }
            if made() { return link }
            let name = (device as NSString).lastPathComponent
            // The kernel sets the identifier right after the size: no udev involved, a short wait.
            for _ in 0..<1000 where access("/sys/block/\(name)/backend", F_OK) != 0 { usleep(10_000) }
            let uevent = "/sys/block/\(name)/uevent"
            if let events = try? UdevEvents() {
                // A processed event that began before ours may come first: then ask once more.
                for _ in 0..<3 {
                    try? writeFileInPlace(uevent, "change")
                    let processed = events.waitForProcessedEvent(of: name, seconds: min(timeout, 30), or: made)
                    if made() { return link }
                    if !processed { break }
                }
            }
            // Where udev's answers cannot be had (udevd in a chroot, say): ask again and watch the link.
            for attempt in 0..<400 {
                if made() { return link }
                if attempt == 0 || attempt == 20 || attempt == 200 { try? writeFileInPlace(uevent, "change") }
                usleep(50_000)
            }
            return nil
        }
    }

    struct Detach: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Detach a volume: its frontend drains the device's I/O and detaches it; its engine stops.",
            discussion: """
                The replicas keep running. Unmount the filesystem first. With --keep-engine the engine \
                goes on serving no device (the frontend disabled): snapshot revert and backups of a \
                detached volume use it; keel volume attach attaches the device again.
                Example: keel volume detach db
                """)

        @OptionGroup var target: VolumeTarget

        @Flag(help: "Only detach the device; the engine keeps running.")
        var keepEngine = false

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            let node = try Node(target.node)
            try node.lock(target.name)
            let volume = try node.volume(target.name)
            let runner = node.runner(volume.runner)
            let before = node.attachment(volume)
            let localEngine = !volume.enginePlacedElsewhere
            for daemon in [node.frontendDaemon(volume)] + (keepEngine || !localEngine ? [] : [node.engineDaemon(volume)]) {
                do { try runner.stop(daemon) } catch {
                    throw CLIError("cannot stop the \(daemon.description): \(error)")
                }
            }
            // A frontend that died left its device holding I/O: nobody will serve it now.
            for index in KernelNBD.devices(withBackend: "keel:\(target.name)") {
                do { try KernelNBD().disconnect(index: index) } catch {
                    throw CLIError("cannot detach /dev/nbd\(index): \(error)")
                }
            }
            var unstopped: [String] = []
            if !localEngine && !keepEngine {
                unstopped = RemoteEngines(volume: volume, node: node, control: control).stop()
            }
            var was = before.device.map { "detached \($0)" + (keepEngine ? ", engine running" : "") }
                ?? (before.engineRunning && !keepEngine ? "engine stopped" : "was not attached")
            if !unstopped.isEmpty {
                was += "; could not ask every engine node to stop the engine (" + unstopped.joined(separator: "; ")
                    + "): a new attach fences one still running"
            }
            if target.json { return try printJSON(["volume": target.name, "device": before.device ?? NSNull(), "result": was] as [String: Any]) }
            print("volume \(target.name): \(was)")
        }
    }
}
