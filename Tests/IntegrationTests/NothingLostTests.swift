import Foundation
import LibNBD
import Synchronization
import Testing

/// The replication defects of the "nothing lost" review, each reproduced on
/// cue (a fault point or a fixed sequence of steps, never luck) and shown fixed.
@Suite(.serialized) struct NothingLostTests {
    typealias Cluster = EngineTests.Cluster

    /// What a replica's metadata says, read straight from its SQLite file.
    struct ReplicaRecords {
        var id: String
        var epoch: UInt64
        var members: [String]

        init(directory: String) throws {
            let script = """
                import sqlite3, sys
                db = sqlite3.connect("file:" + sys.argv[1] + "/replica.sqlite?mode=ro", uri=True)
                rid, epoch = db.execute("SELECT replica_id, epoch FROM replica").fetchone()
                row = db.execute("SELECT members FROM membership").fetchone()
                print(rid); print(epoch); print(row[0] if row else "")
                """
            let result = try run(["/usr/bin/python3", "-c", script, directory], timeout: 30)
            let lines = result.stdout.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
            guard result.status == 0, lines.count >= 3, let epoch = UInt64(lines[1]) else {
                throw TestFailure("cannot read the records in \(directory): \(result.stderr)")
            }
            id = lines[0]
            self.epoch = epoch
            members = lines[2].split(separator: ",").map(String.init)
        }
    }

    /// Defect 1: libnbd completes the queued commands of a link that dies
    /// *inside* a submit call; the write was counted only after the submit, so
    /// it was answered once there and again when the other replicas answered.
    /// The fault point breaks the link to replica 1 just before its 40th command.
    @Test func aLinkThatDiesInsideSubmitAnswersEachWriteOnce() throws {
        let cluster = try Cluster(replicas: 3, size: "16M")
        let engine = try cluster.startEngine(extra: ["--threads", "1"],
                                             environment: ["KEEL_FAULTS": "break-link-in-submit=1@40"])
        let client = try NBDClient()
        try client.connect(uri: cluster.uri)
        let pattern = Pattern()
        for block in 0..<200 {
            try client.write(pattern.bytes(at: UInt64(block) * 4096, count: 4096), at: UInt64(block) * 4096)
        }
        try client.flush()
        #expect(engine.log.contains("fault point: breaking the link to replica 1"), "\(engine.log)")
        #expect(engine.log.contains("volume degraded: 2 of 3 replicas healthy"), "\(engine.log)")
        let reader = try NBDClient()
        try reader.connect(uri: cluster.uri)
        for block in 0..<200 {
            #expect(try reader.read(count: 4096, at: UInt64(block) * 4096) == pattern.bytes(at: UInt64(block) * 4096, count: 4096))
        }
        #expect(engine.stop() == 0, "\(engine.log)")
        for replica in cluster.replicas { replica.stop() }
        #expect(try cluster.headsAreIdentical([0, 2]))
    }

    /// Defect 8: a second engine given a running engine's --listen or
    /// --control address was refused only after it had claimed every replica
    /// (fencing the running engine) and run the dirty-region copy.
    @Test func aRefusedStartChangesNothing() throws {
        let cluster = try Cluster(replicas: 3, size: "16M")
        let control = "unix:" + cluster.scratch.file("engine.control")
        let engine = try cluster.startEngine(extra: ["--control", control])
        let client = try NBDClient()
        try client.connect(uri: cluster.uri)
        try client.write([UInt8](repeating: 1, count: 4096), at: 0, flags: .fua)
        let epochs = try (0..<3).map { try ReplicaRecords(directory: cluster.replicaDirectory($0)).epoch }

        let clashes = [
            ["--listen", engine.address, "--control", "unix:" + cluster.scratch.file("other.control")],
            ["--listen", "unix:" + cluster.scratch.file("other.sock"), "--control", control],
        ]
        for clash in clashes {
            let second = try run([Paths.keel, "engine", "serve", "--volume", "vol", "--size", "16M"]
                                 + cluster.replicaArguments + clash, timeout: 60)
            #expect(second.status != 0, "\(second.stderr)")
            #expect(second.stderr.split(separator: "\n").count == 1, "one line: \(second.stderr)")
            #expect(second.stderr.contains("in use") || second.stderr.contains("cannot serve the control API"),
                    "\(second.stderr)")
        }
        #expect(try (0..<3).map { try ReplicaRecords(directory: cluster.replicaDirectory($0)).epoch } == epochs,
                "no replica was claimed")
        try client.write([UInt8](repeating: 2, count: 4096), at: 0, flags: .fua)
        #expect(try client.read(count: 4096, at: 0) == [UInt8](repeating: 2, count: 4096))
        #expect(try EngineTests.status(control)["health"] as? String == "healthy")
        #expect(engine.stop() == 0)
    }

    /// Defect 3: a FLUSH was acknowledged while the replica that missed it was
    /// still listed as a member on disk (the keeper had not recorded the new
    /// membership yet: slowed down here by a fault point).
    @Test func aFlushIsAcknowledgedOnlyOnceTheFailedReplicaIsOutOfTheMembership() throws {
        let cluster = try Cluster(replicas: 3, size: "16M")
        try cluster.startEngine(environment: ["KEEL_FAULTS": "slow-membership=3"])
        let client = try NBDClient()
        try client.connect(uri: cluster.uri)
        try client.write([UInt8](repeating: 1, count: 4096), at: 0)
        let failed = try ReplicaRecords(directory: cluster.replicaDirectory(1)).id
        #expect(try ReplicaRecords(directory: cluster.replicaDirectory(0)).members.contains(failed))
        cluster.kill9Replica(1)
        // No write in between: a held write answer would let the membership get there first.
        try client.flush()
        for survivor in [0, 2] {
            let members = try ReplicaRecords(directory: cluster.replicaDirectory(survivor)).members
            #expect(!members.contains(failed) && members.count == 2,
                    "replica \(survivor) still lists the failed replica after the FLUSH was acknowledged: \(members)")
        }
    }

    /// Defect 5: an engine given another volume's replica took it over and
    /// fenced that volume. A replica records its volume at the first claim.
    @Test func aReplicaOfAnotherVolumeRefusesTheEngine() throws {
        let cluster = try Cluster(replicas: 2, size: "16M")
        let first = try cluster.startEngine(extra: ["--volume-id", "0a1b2c3d-0000-4000-8000-000000000001"])
        #expect(first.stop() == 0)
        let epochs = try (0..<2).map { try ReplicaRecords(directory: cluster.replicaDirectory($0)).epoch }
        for other in [["--volume", "other"], ["--volume", "vol", "--volume-id", "0a1b2c3d-0000-4000-8000-000000000002"]] {
            let refused = try run([Paths.keel, "engine", "serve", "--size", "16M"] + other + cluster.replicaArguments
                                  + ["--listen", "unix:" + cluster.scratch.file("other.sock")], timeout: 60)
            #expect(refused.status != 0, "\(refused.stderr)")
            #expect(refused.stderr.contains("belongs to volume vol (0a1b2c3d-0000-4000-8000-000000000001)"), "\(refused.stderr)")
            #expect(refused.stderr.split(separator: "\n").count == 1, "\(refused.stderr)")
        }
        #expect(try (0..<2).map { try ReplicaRecords(directory: cluster.replicaDirectory($0)).epoch } == epochs)
        let again = try cluster.startEngine(extra: ["--volume-id", "0a1b2c3d-0000-4000-8000-000000000001"])
        #expect(again.stop() == 0)
    }

    /// Defect 4, its latency half: every replica request read the epoch under
    /// the store's lock, which a dirty mark holds across SQLite's fsyncs, so
    /// reads and writes of regions already marked waited behind a slow mark.
    /// The fault point holds that lock until the test lets go: I/O to a marked
    /// region must finish while a write to a new region still waits for its mark.
    @Test func theDataPathNeverWaitsForTheReplicaStore() throws {
        let scratch = try Scratch()
        let release = scratch.file("release-store")
        FileManager.default.createFile(atPath: release, contents: nil)
        let cluster = try Cluster(replicas: 1, size: "16M",
                                  replicaEnvironment: ["KEEL_REPLICA_FAULTS": "hold-store-on-mark=" + release])
        let engine = try cluster.startEngine()
        let client = try NBDClient()
        try client.connect(uri: cluster.uri)
        try client.write([UInt8](repeating: 1, count: 4096), at: 0, flags: .fua)

        try FileManager.default.removeItem(atPath: release)
        let newRegion = Mutex<Result<Void, Error>?>(nil)
        let uri = cluster.uri
        Thread.detachNewThread {
            let outcome = Result { () throws -> Void in
                let other = try NBDClient()
                try other.connect(uri: uri)
                try other.write([UInt8](repeating: 2, count: 4096), at: 8 << 20, flags: .fua)
            }
            newRegion.withLock { $0 = outcome }
        }
        try poll("the replica to hold its store's lock", seconds: 30) {
            cluster.replicas[0].log.contains("fault point: holding the store's lock")
        }
        try client.write([UInt8](repeating: 3, count: 4096), at: 4096, flags: .fua)
        #expect(try client.read(count: 4096, at: 0) == [UInt8](repeating: 1, count: 4096))
        #expect(newRegion.withLock { $0 == nil }, "the write to a new region did not wait for its mark")

        FileManager.default.createFile(atPath: release, contents: nil)
        try poll("the write to the new region", seconds: 60) { newRegion.withLock { $0 != nil } }
        try newRegion.withLock { try $0!.get() }
        #expect(try client.read(count: 4096, at: 8 << 20) == [UInt8](repeating: 2, count: 4096))
        #expect(engine.stop() == 0, "\(engine.log)")
    }

    /// Defect 10: an epoch off the network that SQLite cannot store crashed
    /// the replica (an Int64 conversion trap); now it is refused.
    @Test func anEpochTooLargeToStoreIsRefused() throws {
        let cluster = try Cluster(replicas: 1, size: "16M")
        let replica = cluster.replicas[0]
        let probe = try run(["nbdinfo", replica.uri(export: "vol@18446744073709551615+x")], timeout: 30)
        #expect(probe.status != 0)
        #expect(replica.process.isRunning, "the replica crashed:\n\(replica.log)")
        let engine = try cluster.startEngine()
        #expect(engine.stop() == 0)
    }
    /// Defect 9: when the replica a rebuild copies from died mid-copy, the
    /// rebuild failed instead of going on from another healthy replica. The
    /// fault point cuts the copy's source connection before region 5; then the
    /// source is killed for real while the copy goes on.
    @Test func aRebuildGoesOnWhenItsSourceDies() throws {
        let cluster = try Cluster(replicas: 3, size: "32M")
        let control = "unix:" + cluster.scratch.file("engine.control")
        let engine = try cluster.startEngine(extra: ["--control", control],
                                             environment: ["KEEL_FAULTS": "break-rebuild-source=5,slow-rebuild=0.1"])
        let writer = try cluster.fio(["--rw=randwrite", "--bs=64k", "--iodepth=8", "--size=32M"])
        #expect(writer.status == 0, "\(writer.stdout)\(writer.stderr)")
        let fresh = try cluster.startReplica(3)
        cluster.replicas.append(fresh)
        let add = try run([Paths.keel, "replica", "add", "--engine", control, fresh.address, "--no-wait"], timeout: 60)
        #expect(add.status == 0, "\(add.stderr)")
        try poll("the copy to pass region 10", seconds: 60) {
            let replicas = try EngineTests.status(control)["replicas"] as! [[String: Any]]
            return (replicas.last?["rebuild_progress"] as? Double ?? 0) > 10.0 / 32
        }
        #expect(engine.log.contains("trying another source"), "\(engine.log)")
        cluster.kill9Replica(1)
        try poll("the new replica to leave WO", seconds: 60) {
            EngineTests.modes(try EngineTests.status(control)).last != "WO"
        }
        #expect(EngineTests.modes(try EngineTests.status(control)) == ["RW", "ERR", "RW", "RW"], "\(engine.log)")
        #expect(engine.stop() == 0)
        for i in [0, 2, 3] { cluster.replicas[i].stop() }
        #expect(try cluster.headsAreIdentical([0, 2, 3]))
    }
}

/// Polls `condition` every 50 ms until it holds, or fails after `seconds`.
func poll(_ what: String, seconds: Double, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try condition() { return }
        usleep(50_000)
    }
    throw TestFailure("timed out after \(seconds) s waiting for \(what)")
}
