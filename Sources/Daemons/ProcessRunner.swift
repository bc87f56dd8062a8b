import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Daemons as processes of their own, for nodes without systemd: each in its
/// own session, tracked by a pid file, logging to a file. Nothing restarts
/// them; `keel volume attach` starts what is missing.
public struct ProcessRunner: DaemonRunner {
    public let runDirectory: String
    public let logDirectory: String
    public let executable: String

    public init(runDirectory: String, logDirectory: String, executable: String = currentExecutable()) {
        self.runDirectory = runDirectory
        self.logDirectory = logDirectory
        self.executable = executable
    }

    func pidPath(_ daemon: Daemon) -> String { "\(runDirectory)/\(daemon.unit).pid" }
    public func logPath(_ daemon: Daemon) -> String { "\(logDirectory)/\(daemon.unit).log" }

    public func start(_ daemon: Daemon) throws {
        let pid = try spawnDetached([executable] + daemon.commandLine, stdout: nil, stderr: logPath(daemon))
        // Until the new program's arguments show in /proc, the pid looks like nobody's.
        for _ in 0..<200 where readSmallFile("/proc/\(pid)/cmdline")?.isEmpty ?? false { usleep(10_000) }
        let text = "\(pid)\n"
        let fd = open(pidPath(daemon), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0, write(fd, text, text.utf8.count) == text.utf8.count else {
            let reason = String(cString: strerror(errno))
            kill(pid, SIGKILL)
            if fd >= 0 { close(fd) }
            throw DaemonError("cannot write \(pidPath(daemon)): \(reason)")
        }
        close(fd)
    }

    public func stop(_ daemon: Daemon) throws {
        defer { unlink(pidPath(daemon)) }
        guard let pid = runningPid(daemon) else { return }
        kill(pid, SIGTERM)
        if waitUntilGone(daemon, seconds: daemon.stopTimeout) { return }
        kill(pid, SIGKILL)
        guard waitUntilGone(daemon, seconds: 5) else {
            throw DaemonError("\(daemon.unit) (pid \(pid)) did not stop, not even on SIGKILL")
        }
        throw DaemonError("\(daemon.unit) (pid \(pid)) did not stop within \(Int(daemon.stopTimeout)) s and was killed")
    }

    public func isRunning(_ daemon: Daemon) -> Bool { runningPid(daemon) != nil }

    public func lastFailure(_ daemon: Daemon) -> String? {
        guard let log = readSmallFile(logPath(daemon)) else { return nil }
        return lastFailureLine(in: log)
    }

    public func forget(_ daemon: Daemon) {
        unlink(pidPath(daemon))
        unlink(logPath(daemon))
    }

    /// The pid in the pid file, if that process is alive and is this daemon
    /// (pids are reused: its command line must match).
    func runningPid(_ daemon: Daemon) -> pid_t? {
        guard let text = readSmallFile(pidPath(daemon)),
              let pid = pid_t(text.trimmingWhitespace()), pid > 0 else { return nil }
        var status: Int32 = 0
        _ = waitpid(pid, &status, WNOHANG)  // reaps it if this process started it and it ended
        guard let stat = readSmallFile("/proc/\(pid)/stat"),
              let state = stat.split(separator: ")").last?.split(separator: " ").first, state != "Z",
              let cmdline = readSmallFile("/proc/\(pid)/cmdline") else { return nil }
        let arguments = cmdline.split(separator: "\0", omittingEmptySubsequences: false).dropFirst().dropLast()
        return Array(arguments.map(String.init)) == daemon.commandLine ? pid : nil
    }

    private func waitUntilGone(_ daemon: Daemon, seconds: Double) -> Bool {
        for _ in 0..<Int(seconds * 20) {
            if runningPid(daemon) == nil { return true }
            usleep(50_000)
        }
        return runningPid(daemon) == nil
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

extension String {
    func trimmingWhitespace() -> String {
        String(drop(while: { $0.isWhitespace }).reversed().drop(while: { $0.isWhitespace }).reversed())
    }
}
