import Foundation
import Syscalls
import Testing

/// Paths of things the tests run.
enum Paths {
    /// The `keel` executable that `swift test` built next to the test bundle.
    static let keel: String = {
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("keel").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir.deleteLastPathComponent()
        }
        let fallback = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../.build/debug/keel").standardized.path
        return fallback
    }()
}

/// A directory on disk (not tmpfs: O_DIRECT must work) removed at deinit.
final class Scratch {
    let path: String

    init() throws {
        let base = ProcessInfo.processInfo.environment["KEEL_TEST_DIR"] ?? "/var/tmp"
        path = base + "/keel-test-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func file(_ name: String) -> String { path + "/" + name }

    /// A sparse file of `size` bytes.
    func image(_ name: String = "disk.img", size: Int) throws -> String {
        let p = file(name)
        FileManager.default.createFile(atPath: p, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: p))
        try handle.truncate(atOffset: UInt64(size))
        try handle.close()
        return p
    }
}

/// Output of a finished command.
struct Finished {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs a command to completion, with a time limit; output goes through
/// files so that a chatty command can never block on a full pipe.
@discardableResult
func run(_ argv: [String], timeout: TimeInterval = 120, environment: [String: String] = [:]) throws -> Finished {
    let scratch = try Scratch()
    let outPath = scratch.file("stdout"), errPath = scratch.file("stderr")
    FileManager.default.createFile(atPath: outPath, contents: nil)
    FileManager.default.createFile(atPath: errPath, contents: nil)
    let process = Process()
    process.executableURL = URL(fileURLWithPath: argv[0].hasPrefix("/") ? argv[0] : "/usr/bin/env")
    process.arguments = argv[0].hasPrefix("/") ? Array(argv.dropFirst()) : argv
    process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
    process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
    process.standardInput = FileHandle.nullDevice
    if !environment.isEmpty {
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
    }
    try process.run()
    let deadline = Date().addingTimeInterval(timeout)
    while process.isRunning && Date() < deadline { usleep(10_000) }
    if process.isRunning {
        process.terminate()
        Issue.record("timed out after \(timeout) s: \(argv.joined(separator: " "))")
    }
    process.waitUntilExit()
    return Finished(status: process.terminationStatus,
                    stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
                    stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "")
}

/// A `keel` server process (export, replica serve, …) started for one test
/// and stopped with SIGTERM.
final class KeelServer {
    let process = Process()
    let address: String
    let logPath: String
    private var stopped = false

    /// The socket path, for unix addresses.
    var socketPath: String? { address.hasPrefix("unix:") ? String(address.dropFirst(5)) : nil }

    var uri: String { uri(export: "") }

    func uri(export: String) -> String {
        if let socketPath { return "nbd+unix:///\(export)?socket=\(socketPath)" }
        return "nbd://\(address)/\(export)"
    }

    /// Runs `keel ARGUMENTS --listen ADDRESS` (a fresh unix socket unless given);
    /// with `executable`, runs that with ARGUMENTS instead (e.g. `ip netns exec … keel …`).
    init(_ arguments: [String], scratch: Scratch, address: String? = nil, executable: String? = nil,
         environment: [String: String] = [:]) throws {
        self.address = address ?? "unix:\(scratch.file("nbd-\(UUID().uuidString.prefix(6)).sock"))"
        logPath = scratch.file("keel-\(UUID().uuidString.prefix(6)).log")
        FileManager.default.createFile(atPath: logPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: executable ?? Paths.keel)
        process.arguments = (executable == nil ? arguments : Array(arguments.dropFirst()))
            + ["--listen", self.address, "--log-level", "info"]
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        process.standardOutput = log
        process.standardError = log
        process.standardInput = FileHandle.nullDevice
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        try process.run()
        try waitUntilListening()
    }

    /// `keel export IMAGE EXTRA…`
    convenience init(image: String, scratch: Scratch, extra: [String] = [], address: String? = nil,
                     environment: [String: String] = [:]) throws {
        try self.init(["export", image] + extra, scratch: scratch, address: address, environment: environment)
    }

    private func waitUntilListening() throws {
        let target = try SocketAddress(parsing: address)
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            guard process.isRunning else { throw TestFailure("keel exited early:\n\(log)") }
            // Engines bind before they claim their replicas: ready once they say they serve (or stand by).
            if log.contains("] serving ") || log.contains("] standing by for "), let fd = try? Socket.connect(to: target) {
                fd.close()
                return
            }
            usleep(20_000)
        }
        throw TestFailure("keel did not listen on \(address):\n\(log)")
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// SIGTERM, then the exit status (nil if it had to be killed).
    @discardableResult
    func stop() -> Int32? {
        guard !stopped else { return process.terminationStatus }
        stopped = true
        process.terminate()
        let deadline = Date().addingTimeInterval(15)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            return nil
        }
        return process.terminationStatus
    }

    deinit { stop() }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Deterministic test data: a random block with each 4 KiB stamped with its
/// absolute offset, so any misplaced or stale block is caught by a compare.
struct Pattern {
    private let seed: [UInt8]

    init(bytes: Int = 1 << 20, seed: UInt64 = 0x6b65656c) {
        var state = seed
        var data = [UInt8](repeating: 0, count: bytes)
        data.withUnsafeMutableBytes { raw in
            let words = raw.bindMemory(to: UInt64.self)
            for i in words.indices {
                state &+= 0x9E37_79B9_7F4A_7C15
                var z = state
                z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
                z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
                words[i] = z ^ (z >> 31)
            }
        }
        self.seed = data
    }

    /// Bytes for `offset ..< offset + count`; offset and count multiples of 4096.
    func bytes(at offset: UInt64, count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { raw in
            seed.withUnsafeBytes { src in
                var done = 0
                while done < count {
                    let start = Int((offset + UInt64(done)) % UInt64(seed.count))
                    let n = min(count - done, seed.count - start)
                    raw.baseAddress!.advanced(by: done).copyMemory(from: src.baseAddress! + start, byteCount: n)
                    done += n
                }
                var block = 0
                while block < count {
                    raw.storeBytes(of: offset + UInt64(block), toByteOffset: block, as: UInt64.self)
                    block += 4096
                }
            }
        }
        return out
    }
}

/// A refused command: one line on stderr that mentions `words`, a non-zero exit, nothing on stdout.
func expectOneLineRefusal(_ argv: [String], mentioning words: [String]) throws {
    let result = try run(argv)
    #expect(result.status != 0, "\(argv) succeeded")
    #expect(result.stderr.split(separator: "\n").count == 1, "\(argv): \(result.stderr)")
    for word in words { #expect(result.stderr.contains(word), "\(argv): \(result.stderr)") }
    #expect(result.stdout.isEmpty, "\(argv): \(result.stdout)")
}

/// A file's permission bits.
func permissions(_ path: String) throws -> Int {
    (try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as! NSNumber).intValue
}

/// A TCP port on `host` that nothing used a moment ago (the kernel's pick; "0.0.0.0" for a port
/// free on every address).
func freeTCPPort(on host: String = "127.0.0.1") throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw TestFailure("socket: \(errno)") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr(host)
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
            bind(fd, pointer, length) == 0 && getsockname(fd, pointer, &length) == 0
        }
    }
    guard bound else { throw TestFailure("bind \(host):0: \(errno)") }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// Starts a server on a free TCP port, trying another port when an outgoing connection took the
/// chosen one in between (a free port is only free until someone binds it).
func onFreeTCPPort<Server>(_ host: String = "127.0.0.1", attempts: Int = 5,
                           _ start: (Int) throws -> Server) throws -> (server: Server, port: Int) {
    for attempt in 1...attempts {
        let port = try freeTCPPort(on: host)
        do { return (try start(port), port) } catch let failure as TestFailure
            where attempt < attempts && "\(failure)".contains("already in use") {
            continue
        }
    }
    preconditionFailure("unreachable: the last attempt returns or throws")
}
