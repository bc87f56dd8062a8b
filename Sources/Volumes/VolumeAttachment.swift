import ControlAPI
import Daemons
import Foundation
import KernelNBD
import NodeRegistry
import Syscalls

extension Node {
    /// Attaches the volume to this host: starts its replicas (here and on
    /// the nodes it placed them on) and its local engine if they are not
    /// running, then its device frontend, which holds /dev/nbdX connected to
    /// the engine (starting it on an engine node when it runs elsewhere).
    /// Returns the device and its udev link (nil: udev made none). Nothing
    /// half-attached is left on failure.
    /// With `mapper` (or when a frontend before left it), the device to mount is the
    /// device-mapper device over /dev/nbdX, which an engine migration holds.
    public func attach(_ name: String, device: String? = nil, force: Bool = false, timeout: Double = 120,
                       mapper: Bool = false, ioTimeout: UInt64? = nil, credentials: ControlCredentials) throws -> (device: String, link: String?) {
        if let device, !device.hasPrefix("/dev/nbd") || UInt32(device.dropFirst("/dev/nbd".count)) == nil {
            throw KeelError("--device takes a kernel NBD device such as /dev/nbd0, not '\(device)'")
        }
        let mapper = mapper || access("/dev/mapper/" + Node.mapperName(name), F_OK) == 0
        return try VolumeAttachment(node: self, name: name, device: device, force: force, timeout: timeout,
                                    mapper: mapper, ioTimeout: ioTimeout, credentials: credentials).run()
    }

    /// Starts the volume's replicas and its engine with no device frontend (user-space
    /// clients such as qemu, fio's nbd engine or nbdcopy use its socket); returns its NBD URI.
    /// An engine already running is left as it is.
    public func startEngineOnly(_ name: String, force: Bool = false, timeout: Double = 120,
                                credentials: ControlCredentials) throws -> String {
        let held = try lock(name)
        defer { held.unlock() }
        let volume = try self.volume(name)
        guard !volume.enginePlacedElsewhere else {
            throw KeelError("volume \(name) runs its engine on engine nodes (\(volume.engineNodes.joined(separator: ", "))); "
                + "--no-device starts an engine on this host only")
        }
        let uri = "nbd+unix:///\(name)?socket=\(layout.engineSocket(name))"
        let attachment = self.attachment(volume)
        if attachment.engineRunning { return uri }
        if attachment.frontendRunning {
            throw KeelError("volume \(name) is attached and its frontend is restarting its engine; try again in a moment")
        }
        try startReplicas(volume)
        try RemoteReplicas(volume: volume, node: self, credentials: credentials).start()
        if !force { try checkNoLiveEngine(volume) }
        let runner = self.runner(volume.runner)
        let engine = engineDaemon(volume)
        do { try runner.start(engine) } catch {
            try? runner.stop(engine)
            throw KeelError("cannot start the engine of \(name): \(runner.lastFailure(engine) ?? "\(error)")")
        }
        do { try waitForEngine(of: name, engine, runner: runner, before: Date().addingTimeInterval(timeout), timeout: timeout) } catch {
            try? runner.stop(engine)
            throw error
        }
        return uri
    }

    /// Detaches the volume: its frontend drains the device's I/O and detaches
    /// it, and its engine stops (here, or through its engine nodes' agents)
    /// unless `keepEngine`. Returns the device it had and what was done.
    public func detach(_ name: String, keepEngine: Bool = false,
                       credentials: ControlCredentials) throws -> (device: String?, result: String) {
        let held = try lock(name)
        defer { held.unlock() }
        let volume = try self.volume(name)
        let runner = self.runner(volume.runner)
        let before = self.attachment(volume)
        let localEngine = !volume.enginePlacedElsewhere
        // A move of its replicas goes on through the engine; the move stops it at its end.
        let migration = (try? runningMigration(of: name)) ?? nil
        let moving = localEngine && before.engineRunning && migration?.kind == ReplicaMove.kind
        if migration?.kind == EngineMigration.kind {
            // Its engine B stands by for a device that goes away: the migration ends here.
            _ = try? EngineMigration(node: self, volume: name).rollback(because: "the volume was detached", locked: true)
        }
        let keepEngine = keepEngine || moving
        for daemon in [frontendDaemon(volume)] + (keepEngine || !localEngine ? [] : [engineDaemon(volume)]) {
            do { try runner.stop(daemon) } catch {
                throw KeelError("cannot stop the \(daemon.description): \(error)")
            }
        }
        // A frontend that died left its device holding I/O: nobody will serve it now.
        for index in KernelNBD.devices(withBackend: "keel:\(name)") {
            do { try KernelNBD().disconnect(index: index) } catch {
                throw KeelError("cannot detach /dev/nbd\(index): \(error)")
            }
        }
        var unstopped: [String] = []
        if !localEngine && !keepEngine {
            unstopped = RemoteEngines(volume: volume, node: self, credentials: credentials).stop()
        }
        let engineNote = moving ? ", engine running until the move of its replicas ends" : keepEngine ? ", engine running" : ""
        var was = before.device.map { "detached \($0)" + engineNote }
            ?? (before.engineRunning && !keepEngine ? "engine stopped" : "was not attached")
        if !unstopped.isEmpty {
            was += "; could not ask every engine node to stop the engine (" + unstopped.joined(separator: "; ")
                + "): a new attach fences one still running"
        }
        return (before.device, was)
    }
}

/// One attach of a volume: what it started goes again if the attach fails.
private struct VolumeAttachment {
    let node: Node
    let name: String
    let device: String?
    let force: Bool
    let timeout: Double
    let mapper: Bool
    let ioTimeout: UInt64?
    let credentials: ControlCredentials

    func run() throws -> (device: String, link: String?) {
        let held = try node.lock(name)
        defer { held.unlock() }
        let volume = try node.volume(name)
        let runner = node.runner(volume.runner)
        let engine = node.engineDaemon(volume)
        let frontend = node.frontendDaemon(volume, device: device, mapper: mapper, ioTimeout: ioTimeout)
        let attachment = node.attachment(volume)
        if attachment.engineRunning, attachment.frontendRunning, let device = attachment.device {
            throw KeelError("volume \(name) is already attached as \(device)")
        }
        try node.startReplicas(volume)
        try RemoteReplicas(volume: volume, node: node, credentials: credentials).start()
        // An engine elsewhere is the frontend's to start: on the first engine node that answers.
        let localEngine = !volume.enginePlacedElsewhere
        if localEngine && !attachment.engineRunning && !attachment.frontendRunning && !force { try node.checkNoLiveEngine(volume) }
        do { _ = try KernelNBD() } catch { throw KeelError("\(error)") }

        let deadline = Date().addingTimeInterval(timeout)
        if localEngine && !attachment.engineRunning && attachment.frontendRunning {
            // The frontend restarts its engine itself: one restarter, or the two would fence each other.
            try node.waitForEngine(of: name, engine, runner: runner, before: deadline, timeout: timeout, startedBy: frontend)
        } else if localEngine && !attachment.engineRunning {
            try start(engine, runner: runner)
            do { try node.waitForEngine(of: name, engine, runner: runner, before: deadline, timeout: timeout) } catch {
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
            if localEngine && !attachment.engineRunning && !attachment.frontendRunning { try? runner.stop(engine) }
            throw error
        }
        let link = waitForLink(device)
        guard mapper else { return (device, link) }
        return (try waitForMapper(before: deadline), link)
    }

    /// The frontend makes the device-mapper device right after attaching /dev/nbdX.
    private func waitForMapper(before deadline: Date) throws -> String {
        let path = "/dev/mapper/" + Node.mapperName(name)
        while Date() < deadline {
            if access(path, F_OK) == 0 { return path }
            usleep(50_000)
        }
        throw KeelError("the device frontend of \(name) attached /dev/nbdX but made no \(path) within \(Int(timeout)) s; see its log")
    }

    private func start(_ daemon: Daemon, runner: DaemonRunner) throws {
        do { try runner.start(daemon) } catch {
            // Under systemd the unit may be enabled already: it must not retry (or come back at boot).
            let reason = runner.lastFailure(daemon) ?? "\(error)"
            try? runner.stop(daemon)
            throw KeelError("cannot attach \(name): \(reason)")
        }
    }

    /// Until the kernel shows a device with the volume's backend identifier and its size.
    private func waitForDevice(_ frontend: Daemon, runner: DaemonRunner, before deadline: Date) throws -> String {
        while Date() < deadline {
            try checkStillRunning(frontend, runner: runner)
            if let index = KernelNBD.devices(withBackend: "keel:\(name)").first,
               let size = readSmallFile("/sys/block/nbd\(index)/size", limit: 64), size != "0\n" {
                return "/dev/nbd\(index)"
            }
            usleep(100_000)
        }
        throw KeelError("the device frontend of \(name) did not attach a device within \(Int(timeout)) s; see its log")
    }

    private func checkStillRunning(_ daemon: Daemon, runner: DaemonRunner) throws {
        guard !runner.isRunning(daemon) else { return }
        throw KeelError(runner.lastFailure(daemon).map { "cannot attach \(name): \($0)" }
            ?? "the \(daemon.description) stopped before the device was attached; see its log")
    }

    /// udev makes the link from the device's change event. The kernel sends
    /// that event as the device gets its size, a moment before the backend
    /// identifier is there, so udev may have found none. Once the identifier
    /// is there, a change event of our own that udev has processed (its
    /// answer on the netlink, not a timer) leaves the link made, however
    /// busy the host.
    private func waitForLink(_ device: String) -> String? {
        let link = "/dev/keel/\(name)"
        let made = { access(link, F_OK) == 0 }
        guard access("/run/udev/control", F_OK) == 0 else { return made() ? link : nil }
        if made() { return link }
        let block = (device as NSString).lastPathComponent
        // The kernel sets the identifier right after the size: no udev involved, a short wait.
        for _ in 0..<1000 where access("/sys/block/\(block)/backend", F_OK) != 0 { usleep(10_000) }
        let uevent = "/sys/block/\(block)/uevent"
        if let events = try? UdevEvents() {
            // A processed event that began before ours may come first: then ask once more.
            for _ in 0..<3 {
                try? writeFileInPlace(uevent, "change")
                let processed = events.waitForProcessedEvent(of: block, seconds: min(timeout, 30), or: made)
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
