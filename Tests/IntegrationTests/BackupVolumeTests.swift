import Foundation
import LibNBD
import SeededRandom
import Testing

/// Backups and restores of volumes of a node (`keel volume create`, real replica and engine
/// processes that keel starts itself): a restore into a new volume and an incremental one onto
/// it, a detached volume's backup (its engine started for it and stopped), skipped when nothing
/// changed, and a backup past its deadline. Attaching during a detached backup needs the kernel:
/// Tests/KernelScenarios/backup-detached.sh.
@Suite(.serialized) struct BackupVolumeTests {
    let source: BackupTests.Fixture
    let state: String
    let store: String

    init() throws {
        source = try BackupTests.Fixture()
        state = source.volume.cluster.scratch.file("state")
        store = "file://" + source.store
    }

    func keel(_ arguments: [String], environment: [String: String] = [:]) throws -> Finished {
        try run([Paths.keel] + arguments + ["--state-dir", state], timeout: 180, environment: environment)
    }

    /// The command's JSON result (the last object it printed), or a failure with its stderr.
    func json(_ arguments: [String]) throws -> [String: Any] {
        let result = try keel(arguments + ["--json"])
        guard result.status == 0 else { throw TestFailure("\(arguments): \(result.stderr)") }
        let lines = result.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        let start = lines.lastIndex(of: "{") ?? 0
        guard let object = (try? JSONSerialization.jsonObject(with: Data(lines[start...].joined(separator: "\n").utf8))) as? [String: Any] else {
            throw TestFailure("\(arguments) printed no JSON result: \(result.stdout) \(result.stderr)")
        }
        return object
    }

    /// What volume `name` holds as of its snapshot, read through `keel snapshot export` from its replicas.
    func contents(of name: String, snapshot: String) throws -> [UInt8] {
        let socket = source.volume.cluster.scratch.file("export-\(name).sock")
        let export = Process()
        export.executableURL = URL(fileURLWithPath: Paths.keel)
        export.arguments = ["snapshot", "export", name, snapshot, "--listen", "unix:" + socket, "--state-dir", state]
        export.standardOutput = FileHandle.nullDevice
        export.standardError = FileHandle.nullDevice
        try export.run()
        defer {
            export.terminate()
            export.waitUntilExit()
        }
        let deadline = Date().addingTimeInterval(30)
        var connected: NBDClient?
        while connected == nil {
            let client = try NBDClient()  // a failed connect leaves a handle that cannot connect again
            do {
                try client.connect(unixSocket: socket)
                connected = client
            } catch where Date() < deadline && export.isRunning { usleep(50_000) }
        }
        let reader = connected!
        defer { try? reader.shutdown() }
        return try reader.read(count: SnapshotTests.size, at: 0)
    }

    func volumeState(_ name: String) throws -> String? {
        let listed = try keel(["volume", "ls", "--json"])
        guard let volumes = (try? JSONSerialization.jsonObject(with: Data(listed.stdout.utf8))) as? [[String: Any]] else {
            throw TestFailure("keel volume ls: \(listed.stdout) \(listed.stderr)")
        }
        return volumes.first { $0["name"] as? String == name }?["state"] as? String
    }

    func snapshotNames(_ name: String) throws -> [String] {
        let listed = try keel(["snapshot", "ls", name, "--json"])
        return ((try? JSONSerialization.jsonObject(with: Data(listed.stdout.utf8))) as? [[String: Any]] ?? []).map { $0["name"] as! String }
    }

    @Test func restoreIntoANewVolumeThenIncrementallyThenBackUpTheDetachedVolume() throws {
        var random = SplitMix64(seed: 1403)
        print("seed 1403")
        let client = source.volume.client
        var first = [UInt8](repeating: 0, count: SnapshotTests.size)
        for block in [0, 2, 5] {
            let bytes = (0 ..< BackupTests.blockSize).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            first.replaceSubrange(block * BackupTests.blockSize ..< (block + 1) * BackupTests.blockSize, with: bytes)
            try client.write(bytes, at: UInt64(block * BackupTests.blockSize))
        }
        let older = try source.create()["id"] as! String
        var second = first
        let changed = (0 ..< 4096).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        second.replaceSubrange(5 * BackupTests.blockSize ..< 5 * BackupTests.blockSize + 4096, with: changed)
        try client.write(changed, at: UInt64(5 * BackupTests.blockSize))
        second.replaceSubrange(0 ..< BackupTests.blockSize, with: [UInt8](repeating: 0, count: BackupTests.blockSize))
        try client.zero(count: UInt64(BackupTests.blockSize), at: 0)
        let newer = try source.create()["id"] as! String
        defer { _ = try? keel(["volume", "rm", "copy"]) }

        let restored = try json(["backup", "restore", older, "--target", store, "--to-volume", "copy", "--replicas", "2"])
        #expect(restored["blocks_written"] as? Int == 3 && restored["blocks_zeroed"] as? Int == 0, "\(restored)")
        #expect(try volumeState("copy") == "detached", "the engine started for the restore is stopped")
        #expect(try contents(of: "copy", snapshot: "restored-" + older.dropFirst(3).lowercased()) == first)

        try expectOneLineRefusal([Paths.keel, "backup", "restore", older, "--target", store, "--to-volume", "copy", "--state-dir", state],
                                 mentioning: ["volume copy exists", "--incremental"])
        let incremental = try json(["backup", "restore", newer, "--target", store, "--to-volume", "copy", "--incremental"])
        #expect(incremental["blocks_written"] as? Int == 1 && incremental["blocks_zeroed"] as? Int == 1,
                "only block 5 written and block 0 zeroed: \(incremental)")
        #expect(try contents(of: "copy", snapshot: "restored-" + newer.dropFirst(3).lowercased()) == second)
        let points = try snapshotNames("copy")
        #expect(points == ["restored-" + newer.dropFirst(3).lowercased()], "the older restore point goes: \(points)")
        try expectOneLineRefusal([Paths.keel, "backup", "restore", older, "--target", store, "--to-volume", "copy", "--incremental",
                                  "--state-dir", state], mentioning: ["newer than \(older)"])

        // The detached volume's backup: its engine started for it, frontend disabled, stopped after.
        let copies = source.volume.cluster.scratch.file("copies")
        try FileManager.default.createDirectory(atPath: copies, withIntermediateDirectories: true)
        let backup = try json(["backup", "create", "copy", "--target", "file://" + copies])
        #expect(backup["blocks"] as? Int == 2, "\(backup)")
        let notes = backup["notes"] as? [String] ?? []
        #expect(notes.contains { $0.contains("detached") } && notes.contains { $0.contains("stopped") }, "\(notes)")
        #expect(try volumeState("copy") == "detached")
        let again = try json(["backup", "create", "copy", "--target", "file://" + copies])
        #expect(again["skipped"] as? Bool == true && (again["reason"] as? String)?.contains("nothing was written") == true, "\(again)")
        let listed = try run([Paths.keel, "backup", "ls", "--target", "file://" + copies, "--json"])
        #expect((try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [Any])?.count == 1)
        #expect(try volumeState("copy") == "detached")

        // Past its deadline: a clear error, its snapshot gone, the engine stopped, nothing listed.
        let late = source.volume.cluster.scratch.file("late")
        try FileManager.default.createDirectory(atPath: late, withIntermediateDirectories: true)
        let pause = source.volume.cluster.scratch.file("pause")
        let snapshotsBefore = try snapshotNames("copy")
        let timedOut = try keel(["backup", "create", "copy", "--target", "file://" + late, "--timeout", "4"],
                                environment: ["KEEL_TEST_PAUSE_AT": "backup-read", "KEEL_TEST_PAUSE_FILE": pause])
        #expect(timedOut.status != 0)
        #expect(timedOut.stderr.contains("did not finish within --timeout 4 s"), "\(timedOut.stderr)")
        #expect(try snapshotNames("copy") == snapshotsBefore, "the snapshot it took is gone")
        #expect(try volumeState("copy") == "detached")
        let none = try run([Paths.keel, "backup", "ls", "--target", "file://" + late])
        #expect(none.stdout.contains("no backup"), "\(none.stdout) \(none.stderr)")
    }
}
