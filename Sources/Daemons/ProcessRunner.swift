import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Daemons as processes of their own, for nodes without systemd: each in its
/// own session, tracked by a pid file, logging to a file. Nothing restarts
/// them; `keel volume attach` starts what is missing.
public struct ProcessRunner: DaemonRunner, Sendable {
    public let runDirectory: String
    public let logDirectory: String
    public let executable: String

    public init(runDirectory: String, logDirectory: String, executable: String = currentExecutable()) {
        self.runDirectory = runDirectory
        self.logDirectory = logDirectory
        self.executable = executable
    }

    func pidPath(_ daemon: Daemon, beside: String = "") -> String { "\(runDirectory)/\(daemon.unit).\(beside.isEmpty ? "" : beside + ".")pid" }
    public func logPath(_ daemon: Daemon, beside: String = "") -> String { "\(logDirectory)/\(daemon.unit).\(beside.isEmpty ? "" : beside + ".")log" }

    /// Each start begins with this line in the log: failures are looked for after the last one.
    static let startMarker = "-- keel: started "

    public func start(_ daemon: Daemon) throws {
        try appendToLog(daemon, Self.startMarker + daemon.commandLine.joined(separator: " ") + "\n")
        let pid = try spawnDetached([executable] + daemon.commandLine, log: logPath(daemon))
        do { try writeFileAtomically(pidPath(daemon), "\(pid)\n") } catch {
            kill(pid, SIGKILL)
            throw DaemonError("cannot record the pid of the \(daemon.description): \(error)")
        }
        // Until the new program's arguments show in /proc (empty, or the
        // parent's, for a moment), the pid looks like nobody's.
        var waited = 0
        while waited < 300 && runningPid(daemon) == nil && processExists(pid) {
            usleep(10_000)
            waited += 1
        }
    }

    public func stop(_ daemon: Daemon) throws {
        guard let pid = runningPid(daemon) else {
            unlink(pidPath(daemon))
            return
        }
        kill(pid, SIGTERM)
        if waitUntilGone(daemon, pid: pid, seconds: daemon.stopTimeout) {
            unlink(pidPath(daemon))
            return
        }
        kill(pid, SIGKILL)
        guard waitUntilGone(daemon, pid: pid, seconds: 5) else {
            throw DaemonError("the \(daemon.description) (pid \(pid)) did not stop, not even on SIGKILL")
        }
        unlink(pidPath(daemon))
        throw DaemonError("the \(daemon.description) (pid \(pid)) did not stop within \(Int(daemon.stopTimeout)) s and was killed")
    }

    /// Starts a second instance of `daemon` from `executable` beside the one
    /// running (a migration's standby engine), with its own pid file and log
    /// named after `beside`; returns its pid.
    public func startBeside(_ daemon: Daemon, executable: String, beside: String) throws -> pid_t {
        let log = logPath(daemon, beside: beside)
        let fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        if fd >= 0 {
            let line = Self.startMarker + daemon.commandLine.joined(separator: " ") + "\n"
            _ = write(fd, line, line.utf8.count)
            close(fd)
        }
        let pid = try spawnDetached([executable] + daemon.commandLine, log: log)
        do { try writeFileAtomically(pidPath(daemon, beside: beside), "\(pid)\n") } catch {
            kill(pid, SIGKILL)
            throw DaemonError("cannot record the pid of the second \(daemon.description): \(error)")
        }
        return pid
    }

    /// The value after `option` on the command line of process `pid` ("" when it has none).
    public static func option(_ option: String, ofProcess pid: pid_t) -> String {
        let arguments = readSmallFile("/proc/\(pid)/cmdline", limit: 64 << 10)?
            .split(separator: "\0", omittingEmptySubsequences: false).map(String.init) ?? []
        return arguments.firstIndex(of: option).map { $0 + 1 < arguments.count ? arguments[$0 + 1] : "" } ?? ""
    }

    /// The instance beside, if it runs.
    public func runningPid(_ daemon: Daemon, beside: String) -> pid_t? { runningPid(daemon, pidFile: pidPath(daemon, beside: beside)) }

    /// Stops the instance beside (SIGTERM, then SIGKILL) and forgets its pid file.
    public func stopBeside(_ daemon: Daemon, beside: String) {
        defer { unlink(pidPath(daemon, beside: beside)) }
        guard let pid = runningPid(daemon, beside: beside) else { return }
        kill(pid, SIGTERM)
        for _ in 0..<Int(daemon.stopTimeout * 20) where !hasExited(pid) { usleep(50_000) }
        if !hasExited(pid) {
            kill(pid, SIGKILL)
            for _ in 0..<100 where !hasExited(pid) { usleep(50_000) }
        }
    }

    /// The instance beside becomes the daemon: its pid file and log take the
    /// daemon's names (the log before is kept with `.previous`).
    public func promote(_ daemon: Daemon, beside: String) throws {
        let log = logPath(daemon)
        _ = rename(log, logPath(daemon, beside: "previous"))
        guard rename(logPath(daemon, beside: beside), log) == 0,
              rename(pidPath(daemon, beside: beside), pidPath(daemon)) == 0 else {
            throw DaemonError("cannot make the second \(daemon.description) the daemon: \(String(cString: strerror(errno)))")
        }
    }

    public func killNow(_ daemon: Daemon) throws {
        guard let pid = runningPid(daemon) else { return }
        kill(pid, SIGKILL)
        guard waitUntilGone(daemon, pid: pid, seconds: 10) else {
            throw DaemonError("the \(daemon.description) (pid \(pid)) did not stop on SIGKILL")
        }
    }

    /// The pid file's daemon is the one to run: its arguments are in `daemon`.
    public func startAgain(_ daemon: Daemon) throws { try start(daemon) }

    public func isRunning(_ daemon: Daemon) -> Bool { runningPid(daemon) != nil }

    public func lastFailure(_ daemon: Daemon) -> String? { lastFailure(daemon, beside: "") }

    public func lastFailure(_ daemon: Daemon, beside: String) -> String? {
        guard let log = readFileTail(logPath(daemon, beside: beside), bytes: 64 << 10) else { return nil }
        let lines = log.split(separator: "\n")
        let thisRun = lines.lastIndex(where: { $0.hasPrefix(Self.startMarker) }).map { lines[$0...] } ?? lines[...]
        return lastFailureLine(in: thisRun.joined(separator: "\n"))
    }

    public func forget(_ daemon: Daemon) {
        unlink(pidPath(daemon))
        unlink(logPath(daemon))
    }

    public func instances(of kind: Daemon.Kind) -> [String] {
        let prefix = "keel-\(kind.rawValue)@", suffix = ".service.pid"
        guard let directory = opendir(runDirectory) else { return [] }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            names.append(withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) })
        }
        return names.filter { $0.hasPrefix(prefix) && $0.hasSuffix(suffix) }
            .map { String($0.dropFirst(prefix.count).dropLast(suffix.count)) }.sorted()
    }

    /// The pid in the pid file, if that process is alive and is this daemon
    /// (pids are reused: its command line must name the daemon).
    func runningPid(_ daemon: Daemon) -> pid_t? { runningPid(daemon, pidFile: pidPath(daemon)) }

    private func runningPid(_ daemon: Daemon, pidFile: String) -> pid_t? {
        guard let text = readSmallFile(pidFile),
              let pid = text.split(whereSeparator: \.isWhitespace).first.flatMap({ pid_t($0) }), pid > 0 else {
            return nil
        }
        var status: Int32 = 0
        _ = waitpid(pid, &status, WNOHANG)  // reaps it if this process started it and it ended
        guard let stat = readSmallFile("/proc/\(pid)/stat"),
              let state = stat.split(separator: ")").last?.split(separator: " ").first, state != "Z",
              let cmdline = readSmallFile("/proc/\(pid)/cmdline") else { return nil }
        let arguments = cmdline.split(separator: "\0", omittingEmptySubsequences: false).dropFirst().map(String.init)
        return arguments.starts(with: daemon.identity) ? pid : nil
    }

    private func processExists(_ pid: pid_t) -> Bool {
        var status: Int32 = 0
        return waitpid(pid, &status, WNOHANG) == 0 || kill(pid, 0) == 0
    }

    private func waitUntilGone(_ daemon: Daemon, pid: pid_t, seconds: Double) -> Bool {
        for _ in 0..<Int(seconds * 20) {
            if runningPid(daemon) == nil && hasExited(pid) { return true }
            usleep(50_000)
        }
        return runningPid(daemon) == nil && hasExited(pid)
    }

    /// Gone, or only its zombie leader left: every thread has closed its files, sockets among them.
    /// A process whose command line already reads empty may still be tearing its threads down, its
    /// socket still listening (a restart then found "address in use").
    private func hasExited(_ pid: pid_t) -> Bool {
        var status: Int32 = 0
        _ = waitpid(pid, &status, WNOHANG)
        guard kill(pid, 0) == 0 else { return errno == ESRCH }
        let state = readSmallFile("/proc/\(pid)/stat")?.split(separator: ")").last?.split(separator: " ").first
        return state == "Z" && threadCount(pid) <= 1
    }

    private func threadCount(_ pid: pid_t) -> Int {
        guard let directory = opendir("/proc/\(pid)/task") else { return 0 }
        defer { closedir(directory) }
        var count = 0
        while let entry = readdir(directory) {
            if entry.pointee.d_name.0 != UInt8(ascii: ".") { count += 1 }
        }
        return count
    }

    private func appendToLog(_ daemon: Daemon, _ line: String) throws {
        let fd = open(logPath(daemon), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw DaemonError("cannot open \(logPath(daemon)): \(String(cString: strerror(errno)))") }
        _ = write(fd, line, line.utf8.count)
        close(fd)
    }
}

public func currentExecutable() -> String {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    return n > 0 ? String(cString: buffer) : CommandLine.arguments[0]
}

/// A daemon that refuses to start says why in one line starting with "keel: ".
func lastFailureLine(in log: String) -> String? {
    log.split(separator: "\n").last(where: { $0.hasPrefix("keel: ") }).map { String($0.dropFirst(6)) }
}
