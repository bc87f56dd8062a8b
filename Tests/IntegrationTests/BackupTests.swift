import Foundation
import LibNBD
import SeededRandom
import Testing

/// `keel backup` on a volume of real `keel replica serve` processes and a `keel engine serve`,
/// against a directory target, checked against what the volume held at each backup.
@Suite(.serialized) struct BackupTests {
    static let blockSize = 2 << 20

    final class Fixture {
        let volume: SnapshotTests.Volume
        let store: String
        let target: String
        /// The S3 server's settings, the way AWS tools take them (none for a directory target).
        let environment: [String: String]

        init(size: String = "16M", s3: Bool = false, replicas: Int = 2) throws {
            volume = try SnapshotTests.Volume(replicas: replicas, size: size)
            store = volume.cluster.scratch.file("store")
            try FileManager.default.createDirectory(atPath: store, withIntermediateDirectories: true)
            if s3 {
                target = "s3://keel-tests/cli-\(UUID().uuidString.prefix(8))"
                environment = try S3Server.environment()
            } else {
                target = "file://" + store
                environment = [:]
            }
        }

        func backup(_ arguments: [String], timeout: TimeInterval = 120, environment extra: [String: String] = [:]) throws -> Finished {
            try run([Paths.keel, "backup"] + arguments, timeout: timeout, environment: environment.merging(extra) { $1 })
        }

        /// `keel backup create vol --json`: its result, the last line of JSON on stdout.
        func create(_ extra: [String] = [], timeout: TimeInterval = 120) throws -> [String: Any] {
            let result = try backup(["create", "vol", "--target", target, "--engine", volume.control, "--json"] + extra, timeout: timeout)
            guard result.status == 0 else { throw TestFailure("backup create: \(result.stderr)") }
            // Progress lines (one JSON object each), then the result, printed over several lines.
            let lines = result.stdout.split(separator: "\n", omittingEmptySubsequences: false)
            let start = lines.lastIndex(of: "{") ?? 0
            return try JSONSerialization.jsonObject(with: Data(lines[start...].joined(separator: "\n").utf8)) as! [String: Any]
        }

        /// `keel backup create` started in the background, once it has published its first batch of blocks.
        func backupPastItsFirstBatch(parallel: Int) throws -> Process {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: Paths.keel)
            process.arguments = ["backup", "create", "vol", "--target", target, "--engine", volume.control, "--parallel", "\(parallel)"]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            let deadline = Date().addingTimeInterval(60)
            while Date() < deadline, process.isRunning, try publishedBlocks() == 0 { usleep(5_000) }
            return process
        }

        /// Blocks under their names in a directory store (not the temporary files of a batch not yet synced).
        func publishedBlocks() throws -> Int {
            let paths = (try? FileManager.default.subpathsOfDirectory(atPath: store + "/blocks")) ?? []
            return paths.filter { $0.split(separator: "/").count == 2 && !$0.contains("/.tmp-") }.count
        }

        func restore(_ id: String, to file: String) throws -> [UInt8] {
            let result = try backup(["restore", id, "--target", target, "--to", file])
            guard result.status == 0 else { throw TestFailure("backup restore: \(result.stderr)") }
            return Array(try Data(contentsOf: URL(fileURLWithPath: file)))
        }

        func snapshots() throws -> [String] {
            let listed = try volume.snapshot(["ls", "vol", "--json"])
            return (try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as! [[String: Any]]).map { $0["name"] as! String }
        }
    }

    /// The S3 server of the whole test run (scripts/s3-test-server: one per process, shared with BackupStoreTests).
    enum S3Server {
        static func environment(secret: String = "keel-test-secret-key-0123456789") throws -> [String: String] {
            let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .deletingLastPathComponent().appendingPathComponent("scripts/s3-test-server").path
            let started = try run(["/bin/bash", script, FileManager.default.temporaryDirectory.path + "/keel-s3-\(getpid())",
                                   "--parent", String(getpid())], timeout: 60)
            guard started.status == 0 else { throw TestFailure("scripts/s3-test-server: \(started.stderr)") }
            return ["AWS_ACCESS_KEY_ID": "KEELTESTACCESSKEY", "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": started.stdout.trimmingCharacters(in: .whitespacesAndNewlines)]
        }
    }

    @Test(arguments: [false, true]) func aFullThenAnIncrementalBackupRestoreWhatTheVolumeHeld(onS3 s3: Bool) throws {
        let fixture = try Fixture(s3: s3)
        let client = fixture.volume.client
        var random = SplitMix64(seed: 1401)
        print("seed 1401")
        var first = [UInt8](repeating: 0, count: SnapshotTests.size)
        for block in [0, 1, 3, 6] {  // blocks 2, 4, 5 and 7 stay zero: not stored
            let bytes = (0 ..< Self.blockSize).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            first.replaceSubrange(block * Self.blockSize ..< (block + 1) * Self.blockSize, with: bytes)
        }
        for block in [0, 1, 3, 6] {
            try client.write(Array(first[block * Self.blockSize ..< (block + 1) * Self.blockSize]), at: UInt64(block * Self.blockSize))
        }
        let full = try fixture.create()
        #expect(full["incremental"] as? Bool == false)
        #expect(full["blocks"] as? Int == 4)
        #expect((full["bytes_read"] as? Int).map { $0 <= 4 * Self.blockSize } == true, "zero blocks are not read: \(full)")

        var second = first
        let changed = (0 ..< 8192).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        second.replaceSubrange(3 * Self.blockSize + 4096 ..< 3 * Self.blockSize + 4096 + changed.count, with: changed)
        try client.write(changed, at: UInt64(3 * Self.blockSize + 4096))
        let incremental = try fixture.create()
        #expect(incremental["incremental"] as? Bool == true)
        #expect(incremental["parent"] as? String == full["id"] as? String)
        #expect(incremental["bytes_read"] as? Int == Self.blockSize, "only the changed block is read: \(incremental)")
        #expect(incremental["new_blocks"] as? Int == 1)
        // The first backup's snapshot went once the second had its own.
        #expect(try fixture.snapshots() == [incremental["snapshot"] as! String])

        let scratch = fixture.volume.cluster.scratch
        #expect(try fixture.restore(full["id"] as! String, to: scratch.file("full.img")) == first)
        #expect(try fixture.restore(incremental["id"] as! String, to: scratch.file("incremental.img")) == second)

        let listed = try fixture.backup(["ls", "--target", fixture.target, "vol", "--json"])
        let ids = (try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as! [[String: Any]]).map { $0["id"] as! String }
        #expect(ids == [full["id"] as! String, incremental["id"] as! String])
        let verify = try fixture.backup(["verify", "--target", fixture.target])
        #expect(verify.status == 0, "\(verify.stderr)")
        #expect(verify.stdout.contains("all sound"))
        if s3 {
            let refused = try fixture.backup(["ls", "--target", fixture.target], environment: ["AWS_SECRET_ACCESS_KEY": "not-the-secret"])
            #expect(refused.status != 0)
            #expect(refused.stderr.split(separator: "\n").count == 1 && refused.stderr.contains("refused our credentials"), "\(refused.stderr)")
            let unreachable = try fixture.backup(["ls", "--target", fixture.target], environment: ["AWS_ENDPOINT_URL": "http://127.0.0.1:1"])
            #expect(unreachable.status != 0)
            #expect(unreachable.stderr.split(separator: "\n").count == 1 && unreachable.stderr.contains("cannot reach"), "\(unreachable.stderr)")
        }

        // With the parent's snapshot gone, the next backup reads the whole volume and says so.
        _ = try fixture.volume.snapshot(["rm", "vol", incremental["snapshot"] as! String])
        let third = try fixture.create()
        #expect(third["incremental"] as? Bool == false)
        #expect((third["full_read_reason"] as? String)?.contains("is gone") == true)
        #expect(third["new_blocks"] as? Int == 0)
    }

    @Test func aKilledBackupLeavesNothingListedAndARerunCompletes() throws {
        let fixture = try Fixture(size: "256M")
        var random = SplitMix64(seed: 1402)
        print("seed 1402")
        var chunk = (0 ..< (32 << 20)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        for region in 0 ..< 8 {
            // Every 2 MiB block different: none deduplicates against another.
            for block in stride(from: 0, to: chunk.count, by: Self.blockSize) { chunk[block] = UInt8(region) }
            try fixture.volume.client.write(chunk, at: UInt64(region << 25))
        }
        // Killed once it published its first batch of blocks (64 of its 128: docs/backups.md).
        let process = try fixture.backupPastItsFirstBatch(parallel: 1)
        #expect(process.isRunning, "the backup finished before it could be killed")
        kill(process.processIdentifier, SIGKILL)
        while process.isRunning { usleep(10_000) }
        let published = try fixture.publishedBlocks()

        let listed = try fixture.backup(["ls", "--target", fixture.target, "--json"])
        #expect((try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [Any])?.isEmpty == true, "\(listed.stdout)")
        let rerun = try fixture.create([], timeout: 300)
        #expect(rerun["incremental"] as? Bool == false)
        #expect(rerun["new_blocks"] as? Int == 128 - published, "the rerun reuses the \(published) blocks the killed one stored: \(rerun)")
        let image = try fixture.restore(rerun["id"] as! String, to: fixture.volume.cluster.scratch.file("restored.img"))
        let volume = try stride(from: 0, to: 256 << 20, by: 32 << 20).flatMap { try fixture.volume.client.read(count: 32 << 20, at: UInt64($0)) }
        #expect(image == volume)
        // The killed run's lock expires; its blocks that no backup names are garbage once it does.
        let verify = try fixture.backup(["verify", "--target", fixture.target, "--quick"])
        #expect(verify.status == 0, "\(verify.stdout) \(verify.stderr)")
    }

    /// `--schedule NAME --keep N` (what a schedule's service runs): the schedule's oldest backups beyond N go,
    /// backups made by hand or by another schedule stay.
    @Test func aScheduleKeepsItsNewestBackups() throws {
        let fixture = try Fixture()
        var made: [String: [String]] = [:]
        for (round, schedule) in ["hourly", "hourly", "", "daily", "hourly", "hourly"].enumerated() {
            try fixture.volume.client.write([UInt8](repeating: UInt8(round + 1), count: 4096), at: UInt64(round * Self.blockSize))
            let result = try fixture.create(schedule.isEmpty ? [] : ["--schedule", schedule, "--keep", "2"])
            made[schedule, default: []].append(result["id"] as! String)
            #expect(result["schedule"] as? String == (schedule.isEmpty ? nil : schedule), "\(result)")
        }
        let listed = try fixture.backup(["ls", "--target", fixture.target, "vol", "--json"])
        let ids = (try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as! [[String: Any]]).map { $0["id"] as! String }
        #expect(Set(ids) == Set(made[""]! + made["daily"]! + made["hourly"]!.suffix(2)), "\(ids)")
        try expectOneLineRefusal([Paths.keel, "backup", "create", "vol", "--target", fixture.target, "--engine", fixture.volume.control,
                                  "--keep", "2"], mentioning: ["--keep", "--schedule"])
        let restored = try fixture.restore(made["hourly"]!.last!, to: fixture.volume.cluster.scratch.file("newest.img"))
        #expect(restored == (try fixture.volume.client.read(count: SnapshotTests.size, at: 0)))
    }

    /// Workers read the replicas' snapshot sessions directly; one lost mid-backup sends its reads
    /// through the export, which reads from the others: the backup completes and restores right.
    @Test func aReplicaLostMidBackupIsReadAround() throws {
        let fixture = try Fixture(size: "256M", replicas: 3)
        var random = SplitMix64(seed: 1404)
        print("seed 1404")
        let chunk = (0 ..< (32 << 20)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        for region in 0 ..< 8 { try fixture.volume.client.write(chunk.map { $0 ^ UInt8(region) }, at: UInt64(region << 25)) }
        let volume = try stride(from: 0, to: 256 << 20, by: 32 << 20).flatMap { try fixture.volume.client.read(count: 32 << 20, at: UInt64($0)) }
        let process = try fixture.backupPastItsFirstBatch(parallel: 3)
        #expect(process.isRunning, "the backup finished before a replica could be lost")
        fixture.volume.cluster.kill9Replica(0)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
        let listed = try fixture.backup(["ls", "--target", fixture.target, "--json"])
        let id = (try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [[String: Any]])?.first?["id"] as? String
        let image = try fixture.restore(try #require(id), to: fixture.volume.cluster.scratch.file("around.img"))
        #expect(image == volume)
    }

    @Test func badInputGetsOneLineAndChangesNothing() throws {
        let fixture = try Fixture()
        let target = fixture.target
        try expectOneLineRefusal([Paths.keel, "backup", "ls", "--target", "file:///nonexistent/keel-store"], mentioning: ["no such directory"])
        try expectOneLineRefusal([Paths.keel, "backup", "ls", "--target", "ftp://host/x"], mentioning: ["not a backup target"])
        try expectOneLineRefusal([Paths.keel, "backup", "ls", "--target", target], mentioning: ["holds no backup store"])
        _ = try fixture.create()
        try expectOneLineRefusal([Paths.keel, "backup", "show", "bk-nothing", "--target", target], mentioning: ["no backup bk-nothing"])
        try expectOneLineRefusal([Paths.keel, "backup", "rm", "bk-nothing", "--target", target], mentioning: ["no backup bk-nothing"])
        let existing = fixture.volume.cluster.scratch.file("exists.img")
        FileManager.default.createFile(atPath: existing, contents: Data([1]))
        let id = (try fixture.backup(["ls", "--target", target, "--json"]).stdout).split(separator: "\"").drop { $0 != "id" }.dropFirst(2).first!
        try expectOneLineRefusal([Paths.keel, "backup", "restore", String(id), "--target", target, "--to", existing], mentioning: ["exists"])
        #expect(try Data(contentsOf: URL(fileURLWithPath: existing)) == Data([1]))
        try expectOneLineRefusal([Paths.keel, "backup", "create", "vol", "--target", target, "--engine", fixture.volume.control,
                                  "--snapshot", "nosuch"], mentioning: ["nosuch"])
        try "{\"format\": 2}".write(toFile: fixture.store + "/config.json", atomically: true, encoding: .utf8)
        try expectOneLineRefusal([Paths.keel, "backup", "ls", "--target", target], mentioning: ["format 2"])
    }
}
