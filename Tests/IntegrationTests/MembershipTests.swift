import Foundation
import LibNBD
import Testing

/// Which replicas an engine trusts: stale replicas after a restart, the rule
/// that a lone stale replica cannot start a volume, claims by engine identity,
/// and what `keel replica add/rm` refuse.
@Suite(.serialized) struct MembershipTests {
    typealias Cluster = EngineTests.Cluster

    /// A replica that missed writes while it was down comes back after an
    /// engine restart as ERR (stale), never as a source of old data, and is
    /// brought back with `keel replica add`.
    @Test func aReplicaThatMissedWritesIsStaleAfterRestart() throws {
        let cluster = try Cluster(replicas: 3, size: "32M")
        try cluster.startEngine()
        let client = try NBDClient()
        try client.connect(uri: cluster.uri)
        try client.write([UInt8](repeating: 1, count: 65536), at: 0, flags: .fua)
        cluster.kill9Replica(2)
        try client.write([UInt8](repeating: 2, count: 65536), at: 0, flags: .fua)
        #expect(cluster.engine!.stop() == 0)

        cluster.replicas[2] = try cluster.startReplica(2)
        // Alone, the stale replica cannot tell it is stale: refused, nothing claimed.
        let alone = try run([Paths.keel, "engine", "serve", "--volume", "vol", "--size", "32M",
                             "--replica", cluster.replicas[2].address,
                             "--listen", "unix:" + cluster.scratch.file("alone.sock")], timeout: 30)
        #expect(alone.status != 0 && alone.stderr.contains("newest data"), "\(alone.stderr)")
        #expect(alone.stderr.split(separator: "\n").count == 1, "\(alone.stderr)")

        let control = "unix:" + cluster.scratch.file("engine.control")
        let engine = try cluster.startEngine(extra: ["--control", control])
        let status = try EngineTests.status(control)
        #expect(EngineTests.modes(status) == ["RW", "RW", "ERR"])
        let replicas = status["replicas"] as! [[String: Any]]
        #expect((replicas[2]["error"] as? String ?? "").contains("stale"), "\(replicas[2])")
        let reader = try NBDClient()
        try reader.connect(uri: cluster.uri)
        for _ in 0..<6 { #expect(try reader.read(count: 65536, at: 0) == [UInt8](repeating: 2, count: 65536)) }

        let add = try run([Paths.keel, "replica", "add", "--engine", control, cluster.replicas[2].address], timeout: 120)
        #expect(add.status == 0 && add.stdout.contains("is RW"), "\(add.stdout)\(add.stderr)")
        #expect(add.stdout.contains("rebuilding") && add.stdout.contains("100%"), "\(add.stdout)")
        // The stale entry is replaced: the address appears once, RW.
        #expect(EngineTests.modes(try EngineTests.status(control)) == ["RW", "RW", "RW"])
        #expect(engine.stop() == 0)
        for replica in cluster.replicas { #expect(replica.stop() == 0) }
        #expect(try cluster.headsAreIdentical([0, 1, 2]))
    }

    /// An unreachable replica that may hold the newest data stops the start
    /// (one line, nothing claimed) unless `--allow-degraded`; one that the
    /// newest membership already left out does not.
    @Test func unreachableReplicasAtStart() throws {
        let cluster = try Cluster(replicas: 3, size: "16M")
        cluster.kill9Replica(2)
        let refused = try run([Paths.keel, "engine", "serve", "--volume", "vol", "--size", "16M",
                               "--listen", "unix:" + cluster.scratch.file("refused.sock")] + cluster.replicaArguments,
                              timeout: 30)
        #expect(refused.status != 0 && refused.stderr.contains("cannot reach replica"), "\(refused.stderr)")
        #expect(refused.stderr.contains("--allow-degraded") && refused.stderr.split(separator: "\n").count == 1)

        let control = "unix:" + cluster.scratch.file("engine.control")
        let degraded = try cluster.startEngine(extra: ["--allow-degraded", "--control", control])
        var status = try EngineTests.status(control)
        #expect(EngineTests.modes(status) == ["RW", "RW", "ERR"] && status["health"] as? String == "degraded")
        let replicas = status["replicas"] as! [[String: Any]]
        #expect((replicas[2]["error"] as? String ?? "").contains("unreachable"), "\(replicas[2])")
        let client = try NBDClient()
        try client.connect(uri: cluster.uri)
        try client.write([UInt8](repeating: 7, count: 4096), at: 0, flags: .fua)
        #expect(degraded.stop() == 0)

        try cluster.startEngine(extra: ["--control", control])
        status = try EngineTests.status(control)
        #expect(EngineTests.modes(status) == ["RW", "RW", "ERR"])
    }

    /// Two engines that pick the same epoch cannot both own a replica: the
    /// epoch stays with the engine that claimed it first.
    @Test func theSameEpochFromAnotherEngineIsRefused() throws {
        let cluster = try Cluster(replicas: 1, size: "16M")
        let socket = cluster.replicas[0].socketPath!
        let first = try NBDClient()
        try first.setExportName("vol@5+aaaa")
        try first.connect(unixSocket: socket)
        let again = try NBDClient()
        try again.setExportName("vol@5+aaaa")
        try again.connect(unixSocket: socket)
        let other = try NBDClient()
        try other.setExportName("vol@5+bbbb")
        #expect(throws: NBDClientError.self) { try other.connect(unixSocket: socket) }
        let newer = try NBDClient()
        try newer.setExportName("vol@6+bbbb")
        try newer.connect(unixSocket: socket)
        #expect(cluster.replicas[0].log.contains("epoch 6 claimed by engine bbbb"))
    }

    @Test func badAddAndRemoveCallsGetOneLine() throws {
        let cluster = try Cluster(replicas: 2, size: "16M")
        let control = "unix:" + cluster.scratch.file("engine.control")
        try cluster.startEngine(extra: ["--control", control])
        func expectFailure(_ arguments: [String], mentioning word: String) throws {
            let result = try run([Paths.keel, "replica"] + arguments, timeout: 60)
            #expect(result.status != 0)
            #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
            #expect(result.stderr.contains(word), "\(result.stderr)")
        }
        // A snapshot, then newer data, on the members: a refused add must touch neither their chains nor their heads.
        let client = try NBDClient()
        try client.connect(uri: cluster.uri)
        try client.write(Pattern().bytes(at: 0, count: 1 << 20), at: 0)
        let snapshot = try run([Paths.keel, "snapshot", "create", "vol", "s1", "--engine", control], timeout: 60)
        #expect(snapshot.status == 0, "\(snapshot.stderr)")
        let newer = [UInt8](repeating: 0x5a, count: 1 << 20)
        try client.write(newer, at: 0)
        let otherSize = try KeelServer(["replica", "serve", "--dir", cluster.scratch.file("big"), "--size", "32M"],
                                       scratch: cluster.scratch, address: "unix:" + cluster.scratch.file("big.sock"))
        try expectFailure(["add", "--engine", control, otherSize.address], mentioning: "holds 33554432 bytes")
        try expectFailure(["add", "--engine", control, "unix:" + cluster.scratch.file("none.sock")],
                          mentioning: "cannot reach the control API")
        try expectFailure(["add", "--engine", control, cluster.replicas[0].address], mentioning: "already in the volume")
        try expectFailure(["add", "--engine", "unix:" + cluster.scratch.file("no-engine"), otherSize.address],
                          mentioning: "cannot reach the engine")
        try expectFailure(["add", "--engine", control, "nowhere"], mentioning: "REPLICA")
        try expectFailure(["add", "--engine", control], mentioning: "Missing expected argument '<replicas> ...'")
        try expectFailure(["add", "--engine", control, otherSize.address, otherSize.address], mentioning: "named twice")
        // Named with one already in the volume, a good replica is not added either.
        let fresh = try cluster.startReplica(2)
        defer { _ = fresh.stop() }
        try expectFailure(["add", "--engine", control, fresh.address, cluster.replicas[1].address], mentioning: "already in the volume")
        #expect(EngineTests.modes(try EngineTests.status(control)) == ["RW", "RW"])
        let listed = try run([Paths.keel, "snapshot", "ls", "vol", "--engine", control], timeout: 60)
        #expect(listed.stdout.contains("s1"), "\(listed.stdout)\(listed.stderr)")
        for _ in 0..<4 { #expect(try client.read(count: 1 << 20, at: 0) == newer, "a member's head was rewritten") }
        try client.shutdown()
        try expectFailure(["rm", "--engine", control, otherSize.address], mentioning: "not a replica of this volume")
        let first = try run([Paths.keel, "replica", "rm", "--engine", control, cluster.replicas[0].address])
        #expect(first.status == 0, "\(first.stderr)")
        try expectFailure(["rm", "--engine", control, cluster.replicas[1].address], mentioning: "last healthy replica")
        // Nothing was added by the refused calls.
        #expect(EngineTests.modes(try EngineTests.status(control)) == ["RW"])
    }

    /// `--no-wait` returns while the rebuild runs; the status shows its progress until RW.
    /// Two replicas named together join at once and are rebuilt in one pass (`RebuildCycleTests`: one read for both).
    @Test func twoReplicasAddedTogetherWithoutWaitingThenWatchTheStatus() throws {
        let cluster = try Cluster(replicas: 1, size: "64M")
        let control = "unix:" + cluster.scratch.file("engine.control")
        try cluster.startEngine(extra: ["--control", control])
        let writer = try NBDClient()
        try writer.connect(uri: cluster.uri)
        for i in 0..<48 { try writer.write(Pattern().bytes(at: UInt64(i) << 20, count: 1 << 20), at: UInt64(i) << 20) }
        let fresh = try [1, 2].map { try cluster.startReplica($0) }
        cluster.replicas += fresh
        let add = try run([Paths.keel, "replica", "add", "--no-wait", "--engine", control] + fresh.map(\.address))
        #expect(add.status == 0, "\(add.stderr)")
        for replica in fresh { #expect(add.stdout.contains("replica \(replica.address) is WO"), "\(add.stdout)") }
        var modes: [String] = []
        for _ in 0..<600 where modes != ["RW", "RW"] {
            let replicas = try EngineTests.status(control)["replicas"] as! [[String: Any]]
            modes = replicas[1...].map { $0["mode"] as! String }
            #expect(modes.allSatisfy { $0 == "WO" || $0 == "RW" }, "\(replicas)")
            usleep(100_000)
        }
        #expect(modes == ["RW", "RW"])
        #expect(cluster.engine!.stop() == 0)
        for replica in cluster.replicas { #expect(replica.stop() == 0) }
        #expect(try cluster.headsAreIdentical([0, 1, 2]))
    }
}
