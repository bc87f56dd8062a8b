import Foundation
import LibNBD
import SeededRandom
import Testing

/// `keel snapshot` on a volume of real `keel replica serve` processes and a
/// `keel engine serve`, driven with libnbd and checked against byte models:
/// each snapshot, read from every replica through its read-only snapshot
/// session, holds exactly the volume as it was when it was taken.
@Suite(.serialized) struct SnapshotTests {
    static let size = 16 << 20

    final class Volume {
        let cluster: EngineTests.Cluster
        let control: String
        let client: NBDClient

        init(replicas: Int = 3, size: String = "16M") throws {
            cluster = try EngineTests.Cluster(replicas: replicas, size: size)
            control = "unix:" + cluster.scratch.file("engine.control")
            try cluster.startEngine(extra: ["--control", control])
            client = try NBDClient()
            try client.connect(uri: cluster.uri)
        }

        func snapshot(_ arguments: [String]) throws -> Finished {
            try run([Paths.keel, "snapshot"] + arguments + ["--engine", control], timeout: 60)
        }

        func create(_ name: String) throws {
            let result = try snapshot(["create", "vol", name])
            guard result.status == 0 else { throw TestFailure("snapshot create \(name): \(result.stderr)") }
        }

        /// The snapshot as one replica serves it, read-only.
        func read(snapshot: String, replica: Int) throws -> [UInt8] {
            let reader = try NBDClient()
            try reader.addMetaContext("base:allocation")
            try reader.setExportName("vol@snapshot:\(snapshot)")
            try reader.connect(unixSocket: cluster.replicas[replica].socketPath!)
            defer { try? reader.shutdown() }
            #expect(reader.isReadOnly)
            let bytes = try reader.read(count: SnapshotTests.size, at: 0)
            // BLOCK_STATUS of the snapshot: no hole where it holds data.
            var at = 0
            for extent in try reader.blockStatus(count: UInt64(SnapshotTests.size), at: 0) {
                if extent.flags & 1 != 0 {
                    #expect(bytes[at..<at + Int(extent.length)].allSatisfy { $0 == 0 }, "snapshot \(snapshot): a hole holds data at \(at)")
                }
                at += Int(extent.length)
            }
            return bytes
        }
    }

    /// Writes, trims and zeroes at any alignment, applied to `model` as the
    /// volume applies them; returns the 4 KiB blocks they changed (a write or
    /// zeroing changes every block it touches, a trim the whole blocks inside it).
    @discardableResult
    static func scribble(_ client: NBDClient, _ model: inout [UInt8], _ random: inout SplitMix64, steps: Int,
                         stamp: UInt8) throws -> Set<Int> {
        var changed = Set<Int>()
        for i in 0..<steps {
            let length = 1 + random.below(random.below(4) == 0 ? 600_000 : 20_000)
            let offset = random.below(size - length)
            switch random.below(10) {
            case 0..<6:
                let data = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i) | stamp }
                try client.write(data, at: UInt64(offset))
                model.replaceSubrange(offset..<offset + length, with: data)
                changed.formUnion(offset / 4096...(offset + length - 1) / 4096)
            case 6..<8:
                try client.zero(count: UInt64(length), at: UInt64(offset))
                model.replaceSubrange(offset..<offset + length, with: repeatElement(0, count: length))
                changed.formUnion(offset / 4096...(offset + length - 1) / 4096)
            default:
                // The engine forwards TRIM; a replica zeroes the whole blocks inside it and leaves the edges.
                try client.trim(count: UInt64(length), at: UInt64(offset))
                let start = (offset + 4095) / 4096 * 4096, end = (offset + length) / 4096 * 4096
                if start < end {
                    model.replaceSubrange(start..<end, with: repeatElement(0, count: end - start))
                    changed.formUnion(start / 4096..<end / 4096)
                }
            }
        }
        return changed
    }

    @Test(arguments: [7] as [UInt64])
    func eachSnapshotReadsItsModelOnEveryReplica(seed: UInt64) throws {
        print("snapshot model test: seed \(seed)")
        let volume = try Volume()
        var random = SplitMix64(seed: seed)
        var model = [UInt8](repeating: 0, count: Self.size)
        try Self.scribble(volume.client, &model, &random, steps: 120, stamp: 0x01)
        try volume.create("s1")
        let s1 = model
        try Self.scribble(volume.client, &model, &random, steps: 120, stamp: 0x02)
        try volume.create("s2")
        let s2 = model
        try Self.scribble(volume.client, &model, &random, steps: 120, stamp: 0x04)

        #expect(try volume.client.read(count: Self.size, at: 0) == model, "seed \(seed): the head")
        for replica in 0..<3 {
            #expect(try volume.read(snapshot: "s1", replica: replica) == s1, "seed \(seed): s1 on replica \(replica)")
            #expect(try volume.read(snapshot: "s2", replica: replica) == s2, "seed \(seed): s2 on replica \(replica)")
        }

        let listed = try volume.snapshot(["ls", "vol", "--json"])
        let snapshots = try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [[String: Any]] ?? []
        #expect(snapshots.map { $0["name"] as? String } == ["s1", "s2"])
        #expect(snapshots.map { $0["parent"] as? String } == [nil, "s1"])

        // A replica restarted reads its chain from disk.
        #expect(volume.cluster.replicas[1].stop() == 0)
        volume.cluster.replicas[1] = try volume.cluster.startReplica(1)
        #expect(try volume.read(snapshot: "s1", replica: 1) == s1, "seed \(seed): s1 after a restart")
        #expect(try volume.read(snapshot: "s2", replica: 1) == s2, "seed \(seed): s2 after a restart")
    }

    @Test func badSnapshotCallsAreRefusedInOneLineAndChangeNothing() throws {
        let volume = try Volume(replicas: 2)
        try volume.create("s1")
        for (arguments, word) in [(["create", "vol", "s1"], "exists already"),
                                  (["create", "vol", "bad/name"], "not a snapshot name")] {
            let result = try volume.snapshot(arguments)
            #expect(result.status != 0, "\(arguments)")
            #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
            #expect(result.stderr.contains(word), "\(result.stderr)")
        }
        let unknown = try run([Paths.keel, "snapshot", "create", "nosuchvolume", "--state-dir", volume.cluster.scratch.file("state")])
        #expect(unknown.status != 0)
        #expect(unknown.stderr.contains("no volume named 'nosuchvolume'"), "\(unknown.stderr)")
        let listed = try volume.snapshot(["ls", "vol", "--json"])
        let snapshots = try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [[String: Any]] ?? []
        #expect(snapshots.map { $0["name"] as? String } == ["s1"])
        // No replica was failed by the refusals.
        let status = try EngineTests.status(volume.control)
        #expect(status["health"] as? String == "healthy")
    }

    @Test func snapshotsUnderFioVerifyLoseNothing() throws {
        let volume = try Volume(replicas: 2, size: "64M")
        let fio = try volume.cluster.startFio(depth: 16, seconds: 6)
        for i in 0..<5 {
            try volume.create("under-load-\(i)")
            usleep(300_000)
        }
        fio.expectSucceeded()
        #expect(try EngineTests.status(volume.control)["health"] as? String == "healthy")
    }

    /// kill -9 of the engine while it takes a snapshot (after the first
    /// replica froze its head, before the others): the next engine gives the
    /// others the snapshot before anything is written, so every replica holds
    /// the same chain and each snapshot reads its model.
    /// The engine dies after one replica switched to s2: the create was never
    /// answered, and the next start undoes it on every replica (a replica's
    /// s2 not sealed everywhere could read differently after a power cut).
    /// s1 and the head read their models; s2 can be taken again.
    @Test func anEngineKilledDuringCreateLeavesOneChainAfterRestart() throws {
        let volume = try Volume()
        var random = SplitMix64(seed: 11)
        var model = [UInt8](repeating: 0, count: Self.size)
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x01)
        try volume.create("s1")
        let s1 = model
        try volume.client.shutdown()
        #expect(volume.cluster.engine!.stop() == 0)

        try volume.cluster.startEngine(extra: ["--control", volume.control], environment: ["KEEL_FAULTS": "die-mid-snapshot"])
        var client = try NBDClient()
        try client.connect(uri: volume.cluster.uri)
        try Self.scribble(client, &model, &random, steps: 60, stamp: 0x02)
        let s2 = model
        let dying = try volume.snapshot(["create", "vol", "s2"])
        #expect(dying.status != 0, "the engine was to die while it took s2")
        volume.cluster.engine!.process.waitUntilExit()
        #expect(volume.cluster.engine!.process.terminationReason == .uncaughtSignal)

        try volume.cluster.startEngine(extra: ["--control", volume.control])
        client = try NBDClient()
        try client.connect(uri: volume.cluster.uri)
        #expect(try client.read(count: Self.size, at: 0) == model)
        #expect(try names(volume) == ["s1"])
        for replica in 0..<3 {
            #expect(try volume.read(snapshot: "s1", replica: replica) == s1, "s1 on replica \(replica)")
            #expect(throws: (any Error).self, "s2 undone on replica \(replica)") {
                try volume.read(snapshot: "s2", replica: replica)
            }
        }
        try volume.create("s2")
        for replica in 0..<3 {
            #expect(try volume.read(snapshot: "s2", replica: replica) == s2, "s2 taken again, on replica \(replica)")
        }
        try Self.scribble(client, &model, &random, steps: 30, stamp: 0x04)
        #expect(try client.read(count: Self.size, at: 0) == model)
        #expect(try volume.read(snapshot: "s2", replica: 2) == s2, "s2 after writes on top")
    }

    // MARK: - Snapshot exports

    /// `keel snapshot export` of s2, the engine running: it reads exactly s2's
    /// model, and `keel:changed:s1` lists exactly the blocks written, trimmed
    /// or zeroed between s1 and s2 (through libnbd and `nbdinfo --map`).
    @Test(arguments: [23] as [UInt64])
    func anExportServesItsSnapshotAndWhatChangedSinceAnOlderOne(seed: UInt64) throws {
        print("snapshot export test: seed \(seed)")
        let volume = try Volume(replicas: 2)
        var random = SplitMix64(seed: seed)
        var model = [UInt8](repeating: 0, count: Self.size)
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x01)
        try volume.create("s1")
        let s1 = model
        let changed = try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x02)
        try volume.create("s2")
        let s2 = model
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x04)

        let export = try KeelServer(["snapshot", "export", "vol", "s2", "--engine", volume.control], scratch: volume.cluster.scratch)
        let reader = try NBDClient()
        try reader.addMetaContext("base:allocation")
        try reader.addMetaContext("keel:changed:s1")
        try reader.connect(uri: export.uri)
        #expect(reader.isReadOnly)
        #expect(try reader.read(count: Self.size, at: 0) == s2, "seed \(seed): the export of s2")
        #expect(throws: (any Error).self) { try reader.write([1], at: 0) }

        // Both contexts in one BLOCK_STATUS, asked in pieces that split runs.
        var reported = Set<Int>()
        var at: UInt64 = 0
        while at < UInt64(Self.size) {
            let count = min(UInt64(Self.size) - at, 3 << 20)
            var position = at
            for extent in try reader.blockStatus(count: count, at: at, context: "keel:changed:s1") {
                #expect(position % 4096 == 0 && extent.length % 4096 == 0, "changes come in 4 KiB blocks")
                if extent.flags & 1 != 0 { reported.formUnion(Int(position / 4096)..<Int((position + UInt64(extent.length)) / 4096)) }
                position += UInt64(extent.length)
            }
            var allocationEnd = at
            for extent in try reader.blockStatus(count: count, at: at) {
                if extent.flags & 1 != 0 {
                    let hole = s2[Int(allocationEnd)..<Int(allocationEnd) + Int(extent.length)]
                    #expect(hole.allSatisfy { $0 == 0 }, "a hole of s2 holds data at \(allocationEnd)")
                }
                allocationEnd += UInt64(extent.length)
            }
            #expect(position > at && allocationEnd > at)
            at = min(position, allocationEnd)
        }
        #expect(reported == changed, "seed \(seed): keel:changed:s1 lists \(reported.count) blocks, \(changed.count) changed")
        try reader.shutdown()

        // nbdinfo lists the same blocks.
        let map = try run(["nbdinfo", "--map=keel:changed:s1", "--json", export.uri])
        #expect(map.status == 0, "\(map.stderr)")
        let extents = try JSONSerialization.jsonObject(with: Data(map.stdout.utf8)) as? [[String: Any]] ?? []
        var listed = Set<Int>()
        for extent in extents where (extent["type"] as? Int ?? 0) & 1 != 0 {
            let offset = extent["offset"] as? Int ?? 0, length = extent["length"] as? Int ?? 0
            listed.formUnion(offset / 4096..<(offset + length) / 4096)
        }
        #expect(listed == changed, "seed \(seed): nbdinfo --map=keel:changed:s1")
        let contexts = try run(["nbdinfo", "--list", "--content", export.uri]).stdout
        #expect(contexts.contains("keel:changed:s1"), "\(contexts)")
        #expect(export.stop() == 0)

        // The oldest snapshot has no older one to compare with.
        let first = try KeelServer(["snapshot", "export", "vol", "s1", "--engine", volume.control], scratch: volume.cluster.scratch)
        let firstReader = try NBDClient()
        try firstReader.connect(uri: first.uri)
        #expect(try firstReader.read(count: Self.size, at: 0) == s1)
    }

    /// With the engine stopped (a detached volume), an export reads from the
    /// replicas named; it goes on from the other replica when one dies; an
    /// unknown snapshot is refused in one line.
    @Test func aDetachedVolumeIsExportedAndSurvivesALostReplica() throws {
        let volume = try Volume(replicas: 2)
        var random = SplitMix64(seed: 31)
        var model = [UInt8](repeating: 0, count: Self.size)
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x01)
        try volume.create("s1")
        let s1 = model
        try Self.scribble(volume.client, &model, &random, steps: 30, stamp: 0x02)
        try volume.client.shutdown()
        #expect(volume.cluster.engine!.stop() == 0)

        let replicas = volume.cluster.replicas.flatMap { ["--replica", $0.address] }
        let unknown = try run([Paths.keel, "snapshot", "export", "vol", "nope", "--listen",
                               "unix:" + volume.cluster.scratch.file("nope.sock")] + replicas)
        #expect(unknown.status != 0)
        #expect(unknown.stderr.split(separator: "\n").count == 1, "\(unknown.stderr)")
        #expect(unknown.stderr.contains("no snapshot 'nope'"), "\(unknown.stderr)")

        let export = try KeelServer(["snapshot", "export", "vol", "s1", "--threads", "1"] + replicas, scratch: volume.cluster.scratch)
        let reader = try NBDClient()
        try reader.connect(uri: export.uri)
        #expect(try reader.read(count: Self.size, at: 0) == s1)
        volume.cluster.kill9Replica(0)
        for _ in 0..<3 { #expect(try reader.read(count: Self.size, at: 0) == s1, "after replica 0 died") }
    }

    // MARK: - Removing snapshots

    func names(_ volume: Volume) throws -> [String] {
        let listed = try volume.snapshot(["ls", "vol", "--json"])
        let snapshots = try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [[String: Any]] ?? []
        return snapshots.compactMap { $0["name"] as? String }
    }

    /// A middle snapshot (its child frozen), the newest (its child the head)
    /// and the oldest (the bottom layer, whose file answers for what it does
    /// not record) are removed in turn: every other snapshot and the head read
    /// their models on every replica, also after a restart, and the layers'
    /// files are gone.
    @Test(arguments: [41] as [UInt64])
    func removingSnapshotsChangesNoOtherView(seed: UInt64) throws {
        print("snapshot removal test: seed \(seed)")
        let volume = try Volume()
        var random = SplitMix64(seed: seed)
        var model = [UInt8](repeating: 0, count: Self.size)
        var taken: [String: [UInt8]] = [:]
        for (i, name) in ["s1", "s2", "s3"].enumerated() {
            try Self.scribble(volume.client, &model, &random, steps: 80, stamp: UInt8(1 << i))
            try volume.create(name)
            taken[name] = model
        }
        try Self.scribble(volume.client, &model, &random, steps: 80, stamp: 0x08)
        func layerFiles(_ replica: Int) throws -> Int {
            try FileManager.default.contentsOfDirectory(atPath: volume.cluster.replicaDirectory(replica) + "/layers").count
        }
        let filesBefore = try layerFiles(0)

        for (removed, left) in [("s2", ["s1", "s3"]), ("s3", ["s1"]), ("s1", [])] {
            let result = try volume.snapshot(["rm", "vol", removed])
            #expect(result.status == 0, "rm \(removed): \(result.stderr)\n\(volume.cluster.engine!.log)")
            taken[removed] = nil
            #expect(try names(volume) == left)
            #expect(try volume.client.read(count: Self.size, at: 0) == model, "seed \(seed): the head after rm \(removed)")
            for replica in 0..<3 {
                for name in left {
                    #expect(try volume.read(snapshot: name, replica: replica) == taken[name], "seed \(seed): \(name) on replica \(replica) after rm \(removed)")
                }
            }
        }
        #expect(try layerFiles(0) == filesBefore - 6, "each removed layer's two files are gone")
        try Self.scribble(volume.client, &model, &random, steps: 40, stamp: 0x10)
        #expect(try volume.client.read(count: Self.size, at: 0) == model)

        // Each replica's head, frozen as one more snapshot, read from disk after a restart.
        try volume.create("final")
        try volume.client.shutdown()
        #expect(volume.cluster.engine!.stop() == 0)
        for replica in 0..<3 {
            volume.cluster.replicas[replica].stop()
            volume.cluster.replicas[replica] = try volume.cluster.startReplica(replica)
            #expect(try volume.read(snapshot: "final", replica: replica) == model, "seed \(seed): replica \(replica) after a restart")
        }
    }

    /// fio writes and verifies while snapshots are taken and removed (the
    /// oldest, its child frozen; then the newest, its child the head being
    /// written): every block fio wrote reads back.
    @Test func removalsUnderFioVerifyLoseNothing() throws {
        let volume = try Volume(replicas: 2, size: "64M")
        let fio = try volume.cluster.startFio(depth: 16, seconds: 8)
        for name in ["a", "b", "c"] {
            try volume.create(name)
            usleep(400_000)
        }
        for name in ["a", "c", "b"] {
            let result = try volume.snapshot(["rm", "vol", name])
            #expect(result.status == 0, "rm \(name): \(result.stderr)")
            usleep(300_000)
        }
        fio.expectSucceeded()
        #expect(try names(volume) == [])
        #expect(try EngineTests.status(volume.control)["health"] as? String == "healthy")
    }

    /// Restarts the engine with the fault point `fault`, runs `keel snapshot
    /// ARGUMENTS`, which fails as the engine kills itself (SIGKILL) half way,
    /// and starts the engine again without faults.
    func restart(_ volume: Volume, dyingAt fault: String, during arguments: [String]) throws {
        try volume.client.shutdown()
        #expect(volume.cluster.engine!.stop() == 0)
        try volume.cluster.startEngine(extra: ["--control", volume.control], environment: ["KEEL_FAULTS": fault])
        let dying = try volume.snapshot(arguments)
        #expect(dying.status != 0, "the engine was to die at \(fault) during \(arguments)")
        volume.cluster.engine!.process.waitUntilExit()
        #expect(volume.cluster.engine!.process.terminationReason == .uncaughtSignal)
        try volume.cluster.startEngine(extra: ["--control", volume.control])
    }

    /// kill -9 of the engine after one replica removed the snapshot and
    /// before the others: the next engine finishes the removal on them (it
    /// does not take the snapshot again), and every view reads its model.
    @Test func anEngineKilledDuringRemovalFinishesItAfterRestart() throws {
        let volume = try Volume()
        var random = SplitMix64(seed: 43)
        var model = [UInt8](repeating: 0, count: Self.size)
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x01)
        try volume.create("s1")
        let s1 = model
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x02)
        try volume.create("s2")
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x04)
        try restart(volume, dyingAt: "die-mid-removal", during: ["rm", "vol", "s2"])
        #expect(volume.cluster.engine!.log.contains("removed now"), "the start finished the removal")
        #expect(try names(volume) == ["s1"])
        let client = try NBDClient()
        try client.connect(uri: volume.cluster.uri)
        #expect(try client.read(count: Self.size, at: 0) == model)
        for replica in 0..<3 {
            #expect(try volume.read(snapshot: "s1", replica: replica) == s1, "s1 on replica \(replica)")
            let reader = try NBDClient()
            try reader.setExportName("vol@snapshot:s2")
            #expect(throws: (any Error).self, "s2 is gone from replica \(replica)") {
                try reader.connect(unixSocket: volume.cluster.replicas[replica].socketPath!)
            }
        }
    }

    /// An unknown snapshot, or one an export reads: one line, non-zero exit, nothing removed.
    @Test func badRemovalsAreRefusedInOneLineAndChangeNothing() throws {
        let volume = try Volume(replicas: 2)
        try volume.create("s1")
        try volume.create("s2")
        let unknown = try volume.snapshot(["rm", "vol", "nope"])
        #expect(unknown.status != 0)
        #expect(unknown.stderr.split(separator: "\n").count == 1, "\(unknown.stderr)")
        #expect(unknown.stderr.contains("no snapshot 'nope'"), "\(unknown.stderr)")

        let export = try KeelServer(["snapshot", "export", "vol", "s1", "--engine", volume.control], scratch: volume.cluster.scratch)
        let reader = try NBDClient()
        try reader.connect(uri: export.uri)
        let busy = try volume.snapshot(["rm", "vol", "s1"])
        #expect(busy.status != 0)
        #expect(busy.stderr.split(separator: "\n").count == 1, "\(busy.stderr)")
        #expect(busy.stderr.contains("being read"), "\(busy.stderr)")
        #expect(try names(volume) == ["s1", "s2"])
        try reader.shutdown()
        #expect(export.stop() == 0)
        // Once the export is gone, the replicas see no reader (polled: the close reaches them asynchronously).
        var removed = false
        for _ in 0..<100 where !removed {
            removed = try volume.snapshot(["rm", "vol", "s1"]).status == 0
            if !removed { usleep(100_000) }
        }
        #expect(removed)
        #expect(try names(volume) == ["s2"])
        #expect(try EngineTests.status(volume.control)["health"] as? String == "healthy")
    }

    // MARK: - Reverting

    /// Revert is refused while a client is attached and while newer
    /// snapshots exist (unless told to discard them); otherwise the head is
    /// discarded on every replica: the volume, and each replica alone, reads
    /// the snapshot; newer snapshots go only with --discard-newer.
    @Test func revertDiscardsTheHeadAndOnlyTheSnapshotsItIsToldTo() throws {
        let volume = try Volume()
        var random = SplitMix64(seed: 47)
        var model = [UInt8](repeating: 0, count: Self.size)
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x01)
        try volume.create("s1")
        let s1 = model
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x02)
        try volume.create("s2")
        let s2 = model
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x04)

        func refused(_ arguments: [String], saying word: String) throws {
            let result = try volume.snapshot(arguments)
            #expect(result.status != 0, "\(arguments)")
            #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
            #expect(result.stderr.contains(word), "\(result.stderr)")
        }
        try refused(["revert", "vol", "s2"], saying: "is attached")
        try volume.client.shutdown()
        // The engine sees the client go when its connection closes: polled.
        var detached = false
        for _ in 0..<100 where !detached {
            let result = try volume.snapshot(["revert", "vol", "nope"])
            detached = !result.stderr.contains("is attached")
            if !detached { usleep(50_000) }
        }
        #expect(detached)
        try refused(["revert", "vol", "nope"], saying: "no snapshot 'nope'")
        try refused(["revert", "vol", "s1"], saying: "--discard-newer")
        #expect(try names(volume) == ["s1", "s2"])

        func expectVolume(reads expected: [UInt8], _ what: String) throws {
            let client = try NBDClient()
            try client.connect(uri: volume.cluster.uri)
            #expect(try client.read(count: Self.size, at: 0) == expected, "\(what): the volume")
            try client.shutdown()
        }
        let reverted = try volume.snapshot(["revert", "vol", "s2"])
        #expect(reverted.status == 0, "\(reverted.stderr)")
        #expect(try names(volume) == ["s1", "s2"])
        try expectVolume(reads: s2, "reverted to s2")
        // Each replica's head, frozen as a snapshot, read from that replica alone.
        try volume.create("check")
        for replica in 0..<3 {
            #expect(try volume.read(snapshot: "check", replica: replica) == s2, "replica \(replica)'s head after the revert")
        }

        let discarding = try volume.snapshot(["revert", "vol", "s1", "--discard-newer"])
        #expect(discarding.status == 0, "\(discarding.stderr)\n\(volume.cluster.engine!.log)")
        #expect(try names(volume) == ["s1"])
        try expectVolume(reads: s1, "reverted to s1")
        var after = s1
        let client = try NBDClient()
        try client.connect(uri: volume.cluster.uri)
        try Self.scribble(client, &after, &random, steps: 30, stamp: 0x08)
        #expect(try client.read(count: Self.size, at: 0) == after, "writes after the revert")
        for replica in 0..<3 { #expect(try volume.read(snapshot: "s1", replica: replica) == s1) }
        #expect(try EngineTests.status(volume.control)["health"] as? String == "healthy")
    }

    // MARK: - Rebuild keeps the chain

    /// A fresh replica added to a volume with snapshots, and a stale one added
    /// back, get every snapshot layer (each snapshot reads its model on them,
    /// and they hold as many layers as their peers), then the head.
    @Test func aRebuiltReplicaGetsEverySnapshotLayer() throws {
        let volume = try Volume()
        var random = SplitMix64(seed: 53)
        var model = [UInt8](repeating: 0, count: Self.size)
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x01)
        try volume.create("s1")
        let s1 = model
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x02)
        try volume.create("s2")
        let s2 = model
        volume.cluster.kill9Replica(2)
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x04)
        #expect(EngineTests.modes(try EngineTests.status(volume.control)) == ["RW", "RW", "ERR"])

        let fresh = try volume.cluster.startReplica(3)
        volume.cluster.replicas.append(fresh)
        let add = try run([Paths.keel, "replica", "add", "--engine", volume.control, fresh.address], timeout: 120)
        #expect(add.status == 0 && add.stdout.contains("is RW"), "\(add.stdout)\(add.stderr)")
        volume.cluster.replicas[2] = try volume.cluster.startReplica(2)
        let again = try run([Paths.keel, "replica", "add", "--engine", volume.control, volume.cluster.replicas[2].address],
                            timeout: 120)
        #expect(again.status == 0 && again.stdout.contains("is RW"), "\(again.stdout)\(again.stderr)")
        #expect(volume.cluster.engine!.log.contains("got snapshot s2"))

        try Self.scribble(volume.client, &model, &random, steps: 30, stamp: 0x08)
        try volume.create("check")
        for replica in [2, 3] {
            #expect(try volume.read(snapshot: "s1", replica: replica) == s1, "s1 on rebuilt replica \(replica)")
            #expect(try volume.read(snapshot: "s2", replica: replica) == s2, "s2 on rebuilt replica \(replica)")
            #expect(try volume.read(snapshot: "check", replica: replica) == model, "the head of rebuilt replica \(replica)")
            let layers = { (i: Int) in try FileManager.default.contentsOfDirectory(atPath: volume.cluster.replicaDirectory(i) + "/layers")
                .filter { $0.hasSuffix(".map") }.count }
            #expect(try layers(replica) == layers(0), "replica \(replica) holds as many layers as replica 0")
        }
    }

    /// kill -9 of the engine after one replica reverted and before the
    /// others: that replica holds the whole volume marked dirty, so the next
    /// start resyncs all of it, and every replica reads the same again.
    @Test func anEngineKilledDuringRevertLeavesReplicasThatReadTheSame() throws {
        let volume = try Volume()
        var random = SplitMix64(seed: 59)
        var model = [UInt8](repeating: 0, count: Self.size)
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x01)
        try volume.create("s1")
        let s1 = model
        try Self.scribble(volume.client, &model, &random, steps: 60, stamp: 0x02)
        try restart(volume, dyingAt: "die-mid-revert", during: ["revert", "vol", "s1"])
        #expect(volume.cluster.engine!.log.contains("made the replicas identical"), "the start resynced the volume")
        let client = try NBDClient()
        try client.connect(uri: volume.cluster.uri)
        let head = try client.read(count: Self.size, at: 0)
        #expect(head == s1 || head == model, "the volume reads as s1 or as before the revert")
        try client.shutdown()
        try volume.create("check")
        for replica in 0..<3 {
            #expect(try volume.read(snapshot: "check", replica: replica) == head, "replica \(replica) reads as the volume")
            #expect(try volume.read(snapshot: "s1", replica: replica) == s1, "s1 on replica \(replica)")
        }
    }
}
