import CSyscalls
#if canImport(Glibc)
import Glibc
#endif

/// Starts `argv` in a session of its own (it outlives the caller), stdin and
/// stdout from and to /dev/null, stderr (where keel logs) appended to `log`.
/// It inherits no other descriptor, and no NOTIFY_SOCKET: under a systemd
/// unit running `keel volume`, the daemon is not that unit's main process.
func spawnDetached(_ argv: [String], log: String) throws -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 2, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
    keel_spawn_close_from(&actions, 3)
    return try spawn(argv, actions: &actions, newSession: true,
                     environment: currentEnvironment().filter { !$0.hasPrefix("NOTIFY_SOCKET=") })
}

/// Runs `argv` to its end and returns its exit status and combined output (for systemctl, journalctl).
func runToCompletion(_ argv: [String]) throws -> (status: Int32, output: String) {
    var pipeEnds: [Int32] = [-1, -1]
    guard pipe(&pipeEnds) == 0 else { throw DaemonError("pipe: \(String(cString: strerror(errno)))") }
    for end in pipeEnds { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], 1)
    posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], 2)
    keel_spawn_close_from(&actions, 3)
    let pid: pid_t
    do { pid = try spawn(argv, actions: &actions, newSession: false, environment: currentEnvironment()) } catch {
        close(pipeEnds[0]); close(pipeEnds[1])
        throw error
    }
    close(pipeEnds[1])
    var output: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = read(pipeEnds[0], &chunk, chunk.count)
        if n > 0 { output += chunk[0..<n] } else if n < 0 && errno == EINTR { continue } else { break }
    }
    close(pipeEnds[0])
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    let exitStatus = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return (exitStatus, String(decoding: output, as: UTF8.self))
}

private func currentEnvironment() -> [String] {
    var entries: [String] = []
    var cursor = Glibc.environ
    while let entry = cursor.pointee {
        entries.append(String(cString: entry))
        cursor += 1
    }
    return entries
}

private func spawn(_ argv: [String], actions: inout posix_spawn_file_actions_t, newSession: Bool,
                   environment: [String]) throws -> pid_t {
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    // The child starts with default signal handling and nothing blocked, whatever the caller did.
    var none = sigset_t()
    sigemptyset(&none)
    var all = sigset_t()
    sigfillset(&all)
    posix_spawnattr_setsigmask(&attributes, &none)
    posix_spawnattr_setsigdefault(&attributes, &all)
    let setsid: Int32 = newSession ? 0x80 : 0  // POSIX_SPAWN_SETSID (glibc 2.26)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | setsid))
    var cArguments = argv.map { strdup($0) } + [nil]
    var cEnvironment = environment.map { strdup($0) } + [nil]
    defer { for pointer in cArguments + cEnvironment { free(pointer) } }
    var pid: pid_t = 0
    let rc = posix_spawnp(&pid, argv[0], &actions, &attributes, &cArguments, &cEnvironment)
    guard rc == 0 else { throw DaemonError("cannot start \(argv[0]): \(String(cString: strerror(rc)))") }
    return pid
}
