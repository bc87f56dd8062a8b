#if canImport(Glibc)
import Glibc
#endif

/// A long-running `keel` process of this node: a replica, a volume's engine,
/// or the device frontend that holds a volume's /dev/nbdX. The same daemon is
/// a systemd unit instance (`keel-replica@NAME`, `keel-engine@VOLUME`,
/// `keel-frontend@VOLUME`) or a process `keel` started itself; either way it
/// runs `keel <kind> serve` with the same arguments.
public struct Daemon: Equatable, Sendable {
    public enum Kind: String, Sendable {
        case replica, engine, frontend
    }

    public var kind: Kind
    /// The unit instance: a replica's name, or the volume of an engine or a frontend.
    public var instance: String
    /// What follows `keel <kind> serve` (an engine's or frontend's `--volume` comes from the instance).
    public var arguments: [String]

    /// Under systemd: the engine's other unit (`keel-engine-alt@VOLUME`), which a live migration alternates with the first.
    public var alternate: Bool
    /// Under systemd: the keel executable the unit runs instead of its own (a live upgrade's engine B).
    public var executable: String?

    public init(kind: Kind, instance: String, arguments: [String], alternate: Bool = false, executable: String? = nil) {
        self.kind = kind
        self.instance = instance
        self.arguments = arguments
        self.alternate = alternate
        self.executable = executable
    }

    public var unit: String { "keel-\(kind.rawValue)\(alternate ? "-alt" : "")@\(instance).service" }

    /// The command line after the executable.
    public var commandLine: [String] {
        [kind.rawValue, "serve"] + (kind == .replica ? [] : ["--volume", instance]) + arguments
    }

    /// The start of the command line that names this daemon whatever its other
    /// arguments: `engine serve --volume NAME`, `frontend serve --volume NAME`, or `replica serve --dir DIR`
    /// (a replica's arguments start with its directory).
    public var identity: [String] { Array(commandLine.prefix(4)) }

    /// For messages: "engine of volume db", "device frontend of volume db", "replica db-r0".
    public var description: String {
        switch kind {
        case .replica: return "replica \(instance)"
        case .engine: return "engine of volume \(instance)"
        case .frontend: return "device frontend of volume \(instance)"
        }
    }

    /// How long a stop may take: a frontend drains the kernel's I/O first, an engine its clients'.
    public var stopTimeout: Double { kind == .replica ? 30 : 90 }
}

/// Starts, stops and watches daemons.
public protocol DaemonRunner {
    /// Starts the daemon (and, under systemd, enables it for boot); returns once it is started, not ready.
    func start(_ daemon: Daemon) throws
    /// Stops the daemon and waits until it is gone; it stays stopped (disabled) afterwards.
    func stop(_ daemon: Daemon) throws
    /// Kills the daemon at once (SIGKILL: it may be hung) and waits until it is gone; it stays enabled.
    func killNow(_ daemon: Daemon) throws
    /// Starts again a daemon `start` configured, as it was configured: under
    /// systemd the unit's environment file is not rewritten (a frontend's unit
    /// may not write /etc).
    func startAgain(_ daemon: Daemon) throws
    func isRunning(_ daemon: Daemon) -> Bool
    /// The daemon's last one-line failure ("keel: …"), if it logged one.
    func lastFailure(_ daemon: Daemon) -> String?
    /// Removes what `start` left behind (configuration, pid and log files).
    func forget(_ daemon: Daemon)
    /// The instances of `kind` this runner started and has not forgotten, running or not.
    func instances(of kind: Daemon.Kind) -> [String]
}

public struct DaemonError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// True when PID 1 is systemd (the test `sd_booted()` makes).
public func systemdIsRunning() -> Bool {
    var info = stat()
    return lstat("/run/systemd/system", &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
}

/// One daemon a runner knows, and whether it runs now.
public struct DaemonCensusEntry: Sendable {
    public var kind: Daemon.Kind
    public var instance: String
    public var running: Bool
}

extension DaemonRunner {
    /// Every engine, replica and frontend this runner knows: what runs on the node.
    public func census() -> [DaemonCensusEntry] {
        [Daemon.Kind.engine, .replica, .frontend].flatMap { kind in
            instances(of: kind).map { instance in
                DaemonCensusEntry(kind: kind, instance: instance,
                                  running: isRunning(Daemon(kind: kind, instance: instance, arguments: [])))
            }
        }
    }
}
