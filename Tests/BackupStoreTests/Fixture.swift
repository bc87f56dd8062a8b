import BackupStore
import Foundation
import S3Client
import Testing

/// Which kind of target a test's store is on.
enum TargetKind: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case directory, s3
    var testDescription: String { rawValue }
}

/// One SeaweedFS server for the whole test process (scripts/s3-test-server): tests share its
/// bucket and each uses a prefix of its own.
enum S3TestServer {
    static let access = "KEELTESTACCESSKEY", secret = "keel-test-secret-key-0123456789", bucket = "keel-tests"

    static let endpoint: Result<String, Error> = Result {
        let directory = FileManager.default.temporaryDirectory.path + "/keel-s3-\(getpid())"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("scripts/s3-test-server").path
        process.arguments = [script, directory, "--parent", String(getpid()), "--bucket", bucket]
        // Not a pipe: children other tests start meanwhile would inherit its write end, and EOF would never come.
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        // Polled for the file the script writes last (Process's own exit news is late inside a static initializer).
        let deadline = Date().addingTimeInterval(60)  // the script gives up after 30 s of polling
        var endpoint = ""
        while Date() < deadline {
            endpoint = (try? String(contentsOfFile: directory + "/endpoint", encoding: .utf8)) ?? ""
            if endpoint.hasSuffix("\n") { break }
            usleep(20_000)
        }
        guard endpoint.hasSuffix("\n") else { throw BackupStoreError("scripts/s3-test-server failed; see \(directory)/weed.log") }
        return endpoint.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    static func settings(secret: String = secret) throws -> S3Settings {
        S3Settings(accessKey: access, secretKey: secret, region: "us-east-1", endpoint: try endpoint.get())
    }

    static func url(_ prefix: String) -> String { "s3://\(bucket)/\(prefix)" }
}

/// A scratch directory with a backup store in it, volumes as image files, and nbdkit serving them.
final class Fixture {
    struct Random {
        var state: UInt64
        init(seed: UInt64) { state = seed }
        mutating func next() -> UInt64 {  // SplitMix64
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    let directory: String
    let store: BackupStore

    init(_ kind: TargetKind = .directory) throws {
        directory = FileManager.default.temporaryDirectory.path + "/keel-backupstore-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory + "/store", withIntermediateDirectories: true)
        let target = switch kind {
        case .directory: try openBackupTarget("file://" + directory + "/store")
        case .s3: try openBackupTarget(S3TestServer.url("unit-\(UUID().uuidString.prefix(8))"), s3Settings: try S3TestServer.settings())
        }
        store = try BackupStore.open(target, create: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: directory) }

    func path(_ name: String) -> String { directory + "/" + name }

    func randomVolume(size: Int, seed: UInt64, zeroBlocks: Set<Int>) -> [UInt8] {
        var random = Random(seed: seed)
        print("volume seed \(seed)")
        var bytes = [UInt8](repeating: 0, count: size)
        bytes.withUnsafeMutableBytes { raw in
            for word in 0 ..< size / 8 { raw.storeBytes(of: random.next(), toByteOffset: word * 8, as: UInt64.self) }
        }
        for block in zeroBlocks {
            let start = block * StoreConfig.defaultBlockSize
            bytes.replaceSubrange(start ..< min(size, start + StoreConfig.defaultBlockSize),
                                  with: repeatElement(0, count: min(size, start + StoreConfig.defaultBlockSize) - start))
        }
        return bytes
    }

    func scramble(_ volume: inout [UInt8], block: Int, seed: UInt64) {
        var random = Random(seed: seed)
        let start = block * StoreConfig.defaultBlockSize
        for offset in stride(from: start, to: start + StoreConfig.defaultBlockSize, by: 512) {
            volume[offset] = UInt8(truncatingIfNeeded: random.next() | 1)
        }
    }

    func image(size: Int, fill: UInt8) -> String {
        let file = path("image-\(UUID().uuidString).img")
        _ = FileManager.default.createFile(atPath: file, contents: Data(repeating: fill, count: size))
        return file
    }

    func read(_ file: String) throws -> [UInt8] { Array(try Data(contentsOf: URL(fileURLWithPath: file))) }

    /// Serves `bytes` read-only through nbdkit and backs them up as volume `name`.
    func backUp(_ bytes: [UInt8], name: String, parent: BackupParent? = nil) throws -> BackupSummary {
        let file = path("volume-\(UUID().uuidString).img")
        _ = FileManager.default.createFile(atPath: file, contents: Data(bytes))
        let export = try serve(file, writable: false)
        defer { export.stop() }
        let writer = BackupWriter(store: store, source: try NBDBackupSource(uri: export.uri), volume: name, snapshot: "s",
                                  snapshotTakenForBackup: false, parent: parent)
        return try writer.run()
    }

    func serve(_ file: String, writable: Bool) throws -> NBDKit { try NBDKit(file: file, writable: writable, directory: directory) }
}

/// `nbdkit file` on a unix socket, for as long as a test needs it.
final class NBDKit {
    let process = Process()
    let socket: String
    var uri: String { "nbd+unix:///?socket=\(socket)" }

    init(file: String, writable: Bool, directory: String) throws {
        socket = directory + "/nbdkit-\(UUID().uuidString.prefix(8)).sock"
        process.executableURL = URL(fileURLWithPath: "/usr/bin/nbdkit")
        process.arguments = ["-f", "-U", socket] + (writable ? [] : ["-r"]) + ["file", file]
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        // Its socket file exists from bind(2) on, before listen(2): ready once a connection is accepted.
        let deadline = Date().addingTimeInterval(20)
        while !Self.accepts(socket) {
            guard Date() < deadline, process.isRunning else { throw BackupStoreError("nbdkit did not start serving \(file)") }
            usleep(10_000)
        }
    }

    static func accepts(_ path: String) -> Bool {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, byte) in path.utf8.prefix(raw.count - 1).enumerated() { raw[i] = byte }
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
    }

    /// SIGKILL (the test runner's children may inherit SIGTERM blocked; the file plugin keeps no state of its
    /// own: every write is in the file once its reply came), then polled with a deadline (Foundation's
    /// waitUntilExit can hang with several children).
    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        let deadline = Date().addingTimeInterval(15)
        while process.isRunning && Date() < deadline { usleep(10_000) }
    }

    deinit { stop() }
}
