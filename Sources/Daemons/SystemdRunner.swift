import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Daemons as instances of the units in `Systemd/`: the arguments go into the
/// unit's environment file (`/etc/keel/<kind>-<instance>.env`), and a state
/// directory other than /var/lib/keel is made writable by a drop-in.
/// `start` enables the instance (it comes back at boot and after a crash);
/// `stop` disables it.
public struct SystemdRunner: DaemonRunner, Sendable {
    public let configurationDirectory: String
    public let unitDirectory: String
    public let stateDirectory: String

    public init(stateDirectory: String, configurationDirectory: String = "/etc/keel",
                unitDirectory: String = "/etc/systemd/system") {
        self.stateDirectory = stateDirectory
        self.configurationDirectory = configurationDirectory
        self.unitDirectory = unitDirectory
    }

    /// The unit templates must be installed (scripts/install) before systemd can run anything.
    public func checkUnitsInstalled() throws {
        for template in ["keel-replica@.service", "keel-engine@.service", "keel-frontend@.service"] {
            guard try runToCompletion(["systemctl", "cat", template]).status == 0 else {
                throw DaemonError("systemd has no \(template): install Keel's units first (bash scripts/install)")
            }
        }
    }

    public func environmentFile(_ daemon: Daemon) -> String {
        let prefix = switch daemon.kind { case .replica: "replica"; case .engine: "volume"; case .frontend: "frontend" }
        return "\(configurationDirectory)/\(prefix)\(daemon.alternate ? "-alt" : "")-\(daemon.instance).env"
    }

    func dropInDirectory(_ daemon: Daemon) -> String { "\(unitDirectory)/\(daemon.unit).d" }

    /// The environment file's contents: systemd splits `$KEEL_…_ARGS` on whitespace.
    public func environment(_ daemon: Daemon) throws -> String {
        if let spaced = daemon.arguments.first(where: { $0.contains(where: \.isWhitespace) || $0.isEmpty }) {
            throw DaemonError("'\(spaced)' cannot be passed through a systemd environment file (whitespace)")
        }
        let variable = "KEEL_\(daemon.kind.rawValue.uppercased())_ARGS"
        return "# Written by keel volume from its registry; keel volume rewrites it when it starts the unit.\n"
            + "\(variable)=\(daemon.arguments.joined(separator: " "))\n"
    }

    public func start(_ daemon: Daemon) throws {
        try makeDirectories(configurationDirectory)
        try writeFileAtomically(environmentFile(daemon), environment(daemon))
        var reload = false
        if stateDirectory != "/var/lib/keel" {
            try makeDirectories(dropInDirectory(daemon))
            try writeFileAtomically(dropInDirectory(daemon) + "/state-directory.conf",
                          "[Service]\nReadWritePaths=\(stateDirectory)\n")
            reload = true
        }
        // It stays until the next start that names an executable: the unit runs that keel from then on.
        if let executable = daemon.executable {
            try makeDirectories(dropInDirectory(daemon))
            let variable = "KEEL_\(daemon.kind.rawValue.uppercased())_ARGS"
            try writeFileAtomically(dropInDirectory(daemon) + "/executable.conf",
                                    "# Written by keel migrate: the engine's keel executable.\n[Service]\nExecStart=\n"
                                    + "ExecStart=\(executable) \(daemon.kind.rawValue) serve --volume %i $\(variable)\n")
            reload = true
        }
        if reload { try systemctl("daemon-reload") }
        try systemctl("enable", "--now", daemon.unit)
    }

    /// Rewrites the daemon's environment file only: what its next start runs (the running one is left as it is).
    public func rewriteEnvironment(_ daemon: Daemon) throws {
        try writeFileAtomically(environmentFile(daemon), environment(daemon))
    }

    /// The pid of the unit's main process, if it runs.
    public func mainPid(_ daemon: Daemon) -> pid_t? {
        properties(daemon, "MainPID")["MainPID"].flatMap { pid_t($0) }.flatMap { $0 > 0 ? $0 : nil }
    }

    public func stop(_ daemon: Daemon) throws {
        try systemctl("disable", "--now", daemon.unit)
    }

    /// Stops the unit and leaves it enabled: `disable` (a reload of systemd's
    /// configuration) takes seconds that an engine switch holds the host's I/O for.
    public func stopOnly(_ daemon: Daemon) throws {
        try systemctl("stop", daemon.unit)
    }

    /// Disables the stopped unit and forgets that it failed (a killed engine's did).
    public func disable(_ daemon: Daemon) throws {
        try systemctl("disable", daemon.unit)
        _ = try? runToCompletion(["systemctl", "reset-failed", daemon.unit])
    }

    public func killNow(_ daemon: Daemon) throws {
        guard isRunning(daemon) else { return }
        try systemctl("kill", "--signal=SIGKILL", daemon.unit)
        for _ in 0..<200 {
            if !isRunning(daemon) { return }
            usleep(50_000)
        }
        throw DaemonError("\(daemon.unit) did not stop within 10 s of SIGKILL")
    }

    public func startAgain(_ daemon: Daemon) throws {
        try systemctl("start", daemon.unit)
    }

    /// Starting (a frontend reports ready only once its device is attached) and
    /// stopping count as running; waiting to be restarted after a failure does not.
    public func isRunning(_ daemon: Daemon) -> Bool {
        let state = properties(daemon, "ActiveState", "SubState")
        return ["active", "activating", "deactivating", "reloading"].contains(state["ActiveState"])
            && state["SubState"] != "auto-restart"
    }

    /// Looks at the current (or last) run of the unit only.
    public func lastFailure(_ daemon: Daemon) -> String? {
        guard let invocation = properties(daemon, "InvocationID")["InvocationID"], !invocation.isEmpty,
              let log = try? runToCompletion(["journalctl", "--no-pager", "-o", "cat", "-n", "50",
                                              "_SYSTEMD_INVOCATION_ID=\(invocation)"]) else { return nil }
        return lastFailureLine(in: log.output)
    }

    private func properties(_ daemon: Daemon, _ names: String...) -> [String: String] {
        guard let result = try? runToCompletion(["systemctl", "show", daemon.unit, "-p", names.joined(separator: ",")]),
              result.status == 0 else { return [:] }
        var values: [String: String] = [:]
        for line in result.output.split(separator: "\n") {
            guard let equals = line.firstIndex(of: "=") else { continue }
            values[String(line[..<equals])] = String(line[line.index(after: equals)...])
        }
        return values
    }

    public func forget(_ daemon: Daemon) {
        unlink(environmentFile(daemon))
        unlink(dropInDirectory(daemon) + "/state-directory.conf")
        unlink(dropInDirectory(daemon) + "/executable.conf")
        if rmdir(dropInDirectory(daemon)) == 0 { _ = try? systemctl("daemon-reload") }
        _ = try? runToCompletion(["systemctl", "reset-failed", daemon.unit])
    }

    public func instances(of kind: Daemon.Kind) -> [String] {
        let prefix = "keel-\(kind.rawValue)@", suffix = ".service"
        guard let result = try? runToCompletion(["systemctl", "list-units", "--all", "--plain", "--no-legend",
                                                 "\(prefix)*\(suffix)"]), result.status == 0 else { return [] }
        return result.output.split(separator: "\n").compactMap { line in
            guard let unit = line.split(separator: " ").first, unit.hasPrefix(prefix), unit.hasSuffix(suffix) else { return nil }
            return String(unit.dropFirst(prefix.count).dropLast(suffix.count))
        }.sorted()
    }
}

/// Runs systemctl; a failure is one line with systemctl's first.
func systemctl(_ arguments: String...) throws {
    let result = try runToCompletion(["systemctl"] + arguments)
    guard result.status == 0 else {
        let detail = result.output.split(separator: "\n").first.map(String.init) ?? "exit status \(result.status)"
        throw DaemonError("systemctl \(arguments.joined(separator: " ")) failed: \(detail)")
    }
}
