import Foundation
import Testing

/// The real-kernel suite: each test boots Debian's kernel in QEMU
/// (`scripts/kernel-vm/vm.py`, TCG, about 5 s) with the host's root shared
/// read-only, and runs one scenario script inside it, where the replicas, the
/// engine and `/dev/nbd0` all live. A guest that cannot start fails the test:
/// this suite never skips.
@Suite(.serialized) struct KernelTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../..").standardized.path

    /// The `keel` built for the tests, which the guest sees at the same path.
    static let keel: String = {
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("keel").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir.deleteLastPathComponent()
        }
        return repository + "/.build/debug/keel"
    }()

    /// Runs a scenario in a fresh guest; its output is printed for the CI log.
    static func scenario(_ name: String, timeout: Int = 600) throws -> (status: Int32, output: String) {
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("keel-kernel-\(UUID().uuidString)")
        FileManager.default.createFile(atPath: output.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: output) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = [repository + "/scripts/kernel-vm/vm.py", "run", "--timeout", "\(timeout)", "--",
                             "sh", repository + "/Tests/KernelTests/Scenarios/\(name).sh", keel]
        let handle = try FileHandle(forWritingTo: output)
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        let text = (try? String(contentsOf: output, encoding: .utf8)) ?? ""
        print("--- kernel scenario \(name) (exit \(process.terminationStatus))\n\(text)")
        return (process.terminationStatus, text)
    }

    @Test func attachMkfsMountDetachAttachVerify() throws {
        let result = try Self.scenario("attach-mkfs-mount")
        #expect(result.status == 0)
        #expect(result.output.contains("checksums match"))
    }

    @Test func keelAttachesOverNetlinkDetachesAndAttachesAgain() throws {
        let result = try Self.scenario("keel-frontend")
        #expect(result.status == 0)
        #expect(result.output.contains("keel frontend: checksums match"))
    }

    @Test func engineKilledAndRestartedUnderFioWithoutIOErrors() throws {
        let result = try Self.scenario("engine-restart")
        #expect(result.status == 0)
        #expect(result.output.contains("engine restarted under fio without I/O errors"))
    }

    @Test func fioVerifyOnTheDeviceWhileAReplicaIsKilled() throws {
        let result = try Self.scenario("fio-verify-replica-killed")
        #expect(result.status == 0)
        #expect(result.output.contains("fio verified with a replica killed"))
    }
}
