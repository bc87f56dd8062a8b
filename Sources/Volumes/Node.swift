import ControlAPI
import Daemons
import Foundation
import KernelNBD
import NodeRegistry
import Syscalls

/// This node as `keel volume` sees it: its registry, and the daemons of its
/// volumes (replicas it holds, engines of attached volumes).
public struct Node {
    public let layout: NodeLayout
    public let registry: Registry
    /// The `keel` executable that runs the daemons keel starts itself (this process's own, for the CLI).
    public let executable: String

    public init(layout: NodeLayout, executable: String = currentExecutable()) throws {
        self.layout = layout
        self.executable = executable
        do { registry = try Registry(layout: layout) } catch { throw KeelError("\(error)") }
    }

    public func volume(_ name: String) throws -> VolumeRecord {
        guard let volume = try registry.volume(named: name) else {
            throw KeelError("no volume named '\(name)' on this node (state directory \(layout.stateDirectory)); "
                + "see 'keel volume ls', or create it with 'keel volume create \(name) --size SIZE'")
        }
        return volume
    }

    public func runner(_ kind: VolumeRecord.Runner) -> any DaemonRunner & Sendable {
        switch kind {
        case .systemd: return SystemdRunner(stateDirectory: layout.stateDirectory)
        case .keel: return ProcessRunner(runDirectory: layout.runDirectory, logDirectory: layout.logDirectory, executable: executable)
        }
    }

    /// The volume's replicas this node runs, with their data sockets.
    public func localReplicas(_ volume: VolumeRecord) -> [(daemon: Daemon, socket: String)] {
        volume.replicas.compactMap { localReplica($0, of: volume) }
    }

    /// The daemon of a replica this node runs, with its data socket; nil for one elsewhere.
    public func localReplica(_ replica: ReplicaRecord, of volume: VolumeRecord) -> (daemon: Daemon, socket: String)? {
        guard let directory = replica.directory else { return nil }
        let socket = layout.replicaSocket(volume: volume.name, index: replica.slot)
        return (Daemon(kind: .replica, instance: layout.replicaName(volume: volume.name, index: replica.slot),
                       arguments: ["--dir", directory, "--listen", "unix:" + socket, "--size", "\(volume.size)"]),
                socket)
    }

    public func engineDaemon(_ volume: VolumeRecord) -> Daemon {
        var arguments = ["--size", "\(volume.size)"]
        for replica in volume.engineReplicas { arguments += ["--replica", replica.address] }
        arguments += ["--listen", "unix:" + layout.engineSocket(volume.name), "--control", engineControl(volume.name)]
        // A node with credentials is in a TLS cluster: its links to replicas on other nodes are TLS,
        // as are its control calls to them (and TLS agents' replicas require it).
        if volume.engineReplicas.contains(where: { !$0.address.hasPrefix("unix:") }),
           let credentials = nodeCredentialsDirectory(stateDirectory: layout.stateDirectory) {
            arguments += ["--replica-tls", "require", "--tls-certificates", credentials]
        }
        if !volume.id.isEmpty { arguments += ["--volume-id", volume.id] }
        return Daemon(kind: .engine, instance: volume.name, arguments: arguments, alternate: volume.engineUnit == .alternate)
    }

    /// The process that holds the volume's /dev/nbdX, connected to its engine:
    /// the local one, or one its engine nodes' agents start and fail over.
    public func frontendDaemon(_ volume: VolumeRecord, device: String? = nil, mapper: Bool = false, ioTimeout: UInt64? = nil) -> Daemon {
        var arguments = ["--connections", "\(volume.connections)", "--status-file", layout.frontendStatus(volume.name)]
        if let ioTimeout { arguments += ["--io-timeout", "\(ioTimeout)"] }
        if mapper { arguments += ["--mapper", "--control", "unix:" + layout.frontendControl(volume.name)] }
        if volume.enginePlacedElsewhere {
            for engineNode in engineNodes(volume) { arguments += ["--engine-node", engineNode.address] }
            arguments += ["--size", "\(volume.size)", "--engine-port", "\(volume.enginePort)"]
            for replica in volume.engineReplicas { arguments += ["--replica", replica.address] }
            if !volume.id.isEmpty { arguments += ["--volume-id", volume.id] }
            arguments += ["--migrations", "--state-dir", layout.stateDirectory]
        } else {
            arguments += ["--engine", "unix:" + layout.engineSocket(volume.name), "--restart-engine",
                          "--state-dir", layout.stateDirectory]
        }
        if let device { arguments += ["--device", device] }
        return Daemon(kind: .frontend, instance: volume.name, arguments: arguments)
    }

    /// The device-mapper device of an attach with --mapper: `/dev/mapper/keel-VOLUME`.
    public static func mapperName(_ volume: String) -> String { "keel-\(volume)" }

    /// The volume's engine nodes, in order, as the registry knows them (it keeps a node while a volume names it).
    public func engineNodes(_ volume: VolumeRecord) -> [NodeRecord] {
        volume.engineNodes.compactMap { name in (try? registry.node(named: name)) ?? nil }
    }

    public func engineControl(_ volume: String) -> String { "unix:" + layout.engineControl(volume) }

    /// Where the volume is attached on this node.
    public func attachment(_ volume: VolumeRecord) -> Attachment {
        let devices = KernelNBD.devices(withBackend: "keel:\(volume.name)")
        let link = "/dev/keel/\(volume.name)"
        let runner = self.runner(volume.runner)
        let frontendRunning = runner.isRunning(frontendDaemon(volume))
        let status = frontendRunning ? FrontendStatusFile.read(layout.frontendStatus(volume.name)) : nil
        return Attachment(device: devices.first.map { "/dev/nbd\($0)" },
                          link: access(link, F_OK) == 0 ? link : nil,
                          engineRunning: volume.enginePlacedElsewhere ? status?.state == .connected
                                                                      : runner.isRunning(engineDaemon(volume)),
                          frontendRunning: frontendRunning, frontend: status)
    }

    public struct Attachment {
        /// The kernel device carrying the volume's backend identifier.
        public var device: String?
        /// `/dev/keel/<volume>`, when udev made it.
        public var link: String?
        /// For an engine on other nodes: the frontend is connected to it.
        public var engineRunning: Bool
        /// The device frontend that holds the device.
        public var frontendRunning: Bool
        public var frontend: FrontendStatusFile?

        public var summary: String {
            if let frontend, frontend.state != .connected, let device {
                return "attached \(device), engine \(frontend.engine) does not answer"
                    + (frontend.state == .failing ? " past the dead-connection timeout: I/O fails" : " (I/O waits)")
            }
            switch (device, engineRunning) {
            case (let device?, true): return "attached \(device)" + (frontendRunning ? "" : ", no frontend (dead links are not replaced)")
            case (let device?, false): return "attached \(device), engine not running (I/O waits)"
            case (nil, true): return "engine running, frontend disabled"
            case (nil, false): return "detached"
            }
        }
    }

    /// Starts the volume's local replicas that are not running and waits until each accepts connections.
    public func startReplicas(_ volume: VolumeRecord) throws {
        let runner = self.runner(volume.runner)
        for (daemon, socket) in localReplicas(volume) where !runner.isRunning(daemon) {
            do { try runner.start(daemon) } catch { throw KeelError("cannot start \(daemon.description): \(error)") }
            try waitUntilServing(daemon, socket: socket, runner: runner)
        }
    }

    /// Serialises the commands that change a volume (two creates or two
    /// attaches of one name, in this process or others); held until `unlock`.
    public func lock(_ volume: String) throws -> VolumeLock {
        let path = "\(layout.runDirectory)/\(volume).lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw KeelError("\(SystemError.current("open \(path)"))") }
        for _ in 0..<1200 {
            if flock(fd, LOCK_EX | LOCK_NB) == 0 { return VolumeLock(fd: fd) }
            usleep(100_000)
        }
        close(fd)
        throw KeelError("another keel volume command has been working on \(volume) for 2 minutes; try again when it is done")
    }

    private func waitUntilServing(_ daemon: Daemon, socket: String, runner: DaemonRunner) throws {
        for _ in 0..<600 {
            if unixSocketAccepts(socket) { return }
            if !runner.isRunning(daemon) {
                let reason = runner.lastFailure(daemon) ?? "it stopped without saying why"
                throw KeelError("\(daemon.description) did not start: \(reason)")
            }
            usleep(50_000)
        }
        throw KeelError("\(daemon.description) did not accept connections on \(socket) within 30 s")
    }
}

/// True when something listens on the unix socket (a stale socket file refuses).
public func unixSocketAccepts(_ path: String) -> Bool {
    guard let fd = try? Socket.connect(to: .unix(path: path)) else { return false }
    fd.close()
    return true
}

/// A volume's lock, held from `Node.lock` until `unlock`.
public final class VolumeLock {
    private var fd: Int32

    init(fd: Int32) { self.fd = fd }

    public func unlock() {
        guard fd >= 0 else { return }
        close(fd)  // releases the flock
        fd = -1
    }

    deinit { unlock() }
}
