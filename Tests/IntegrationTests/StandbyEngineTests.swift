import Foundation
import Testing

/// A migration's new engine: `keel engine serve --standby` opens its sessions
/// to every replica without claiming anything, so the engine that runs goes
/// on undisturbed; `keel engine activate` claims the replicas with those
/// sessions and serves, every write before the switch still there.
@Suite(.serialized) struct StandbyEngineTests {
    typealias Cluster = EngineTests.Cluster

    static func startStandby(_ cluster: Cluster, control: String, environment: [String: String] = [:]) throws -> KeelServer {
        try KeelServer(["engine", "serve", "--standby", "--volume", "vol", "--size", cluster.size, "--control", control]
                       + cluster.replicaArguments, scratch: cluster.scratch, environment: environment)
    }

    /// Stamped writes to `blocks` blocks at `offset`, for `seconds`: all acknowledged, none failed.
    static func write(_ uri: String, offset: Int, log: String, seed: UInt64) throws {
        let write = try run(["/usr/bin/python3", FreshnessTests.stamp, "write", "--uri", uri, "--blocks", "256",
                             "--offset", "\(offset)", "--seconds", "2", "--depth", "16", "--seed", "\(seed)", "--log", log],
                            timeout: 120)
        #expect(write.status == 0 && (write.stdout + write.stderr).contains("errors 0, unanswered 0"), "\(write.stdout)\(write.stderr)")
    }

    /// With the engines stopped: each replica's head, read alone, holds every write of the logs.
    static func expectEveryWriteOnEveryReplica(_ cluster: Cluster, logs: [(path: String, seed: UInt64)]) throws {
        for replica in cluster.replicas { replica.stop() }
        let heads = cluster.replicas.indices.map { cluster.replicaDirectory($0) + "/layers/head.img" }
        for log in logs { try FreshnessTests.expectFreshAndIdentical(heads, log: log.path, seed: log.seed) }
    }

    @Test func aStandbyEngineFencesNobodyThenTakesTheVolumeOver() throws {
        let cluster = try Cluster(replicas: 3, size: "16M")
        let controlA = "unix:" + cluster.scratch.file("a.control")
        let controlB = "unix:" + cluster.scratch.file("b.control")
        let engineA = try cluster.startEngine(extra: ["--control", controlA])
        let engineB = try Self.startStandby(cluster, control: controlB)
        #expect(engineB.log.contains("sessions of epoch 2 open to 3 of 3 replica(s)"), "\(engineB.log)")

        // B stands by: A keeps its epoch and serves every write.
        let seed = UInt64.random(in: 1...UInt64(UInt32.max))
        print("standby writer seed \(seed)")
        let beforeLog = cluster.scratch.file("before.log")
        try Self.write(cluster.uri, offset: 0, log: beforeLog, seed: seed)
        let status = try EngineTests.status(controlA)
        #expect(status["epoch"] as? UInt64 == 1 && status["health"] as? String == "healthy", "\(status)")

        // The switch: A's client quiet, A stopped, B activated with one claim per replica.
        #expect(engineA.stop() == 0)
        let activate = try run([Paths.keel, "engine", "activate", "--engine", controlB], timeout: 60)
        #expect(activate.status == 0 && activate.stdout.contains("serves the volume: epoch 2"), "\(activate.stdout)\(activate.stderr)")
        #expect(engineB.log.contains("activated: claimed epoch 2"), "\(engineB.log)")
        let afterLog = cluster.scratch.file("after.log")
        try Self.write(engineB.uri(export: "vol"), offset: 1 << 20, log: afterLog, seed: seed + 1)
        let statusB = try EngineTests.status(controlB)
        #expect(statusB["epoch"] as? UInt64 == 2 && statusB["health"] as? String == "healthy", "\(statusB)")

        #expect(engineB.stop() == 0)
        try Self.expectEveryWriteOnEveryReplica(cluster, logs: [(beforeLog, seed), (afterLog, seed + 1)])
    }

    /// Another engine started while B stood by: its epoch is taken, B claims nothing and says why.
    @Test func aStandbyEngineOutbidMeanwhileRefusesToActivate() throws {
        let cluster = try Cluster(replicas: 2, size: "16M")
        let engineA = try cluster.startEngine()
        let controlB = "unix:" + cluster.scratch.file("b.control")
        let engineB = try Self.startStandby(cluster, control: controlB)
        #expect(engineA.stop() == 0)
        let restarted = try cluster.startEngine(extra: ["--control", "unix:" + cluster.scratch.file("a2.control")])
        try expectOneLineRefusal([Paths.keel, "engine", "activate", "--engine", controlB],
                                 mentioning: ["moved on to epoch 2", "start a standby engine again"])
        #expect(engineB.stop() != 0, "B failed its start")
        let seed = UInt64.random(in: 1...UInt64(UInt32.max))
        print("outbid writer seed \(seed)")
        try Self.write(cluster.uri, offset: 0, log: cluster.scratch.file("w.log"), seed: seed)
        #expect(restarted.stop() == 0)
    }

    /// The standby engine dies having claimed one replica of three (the old engine stopped for the
    /// switch): the next engine to start takes them all, and every write before and after is there.
    @Test func aStandbyEngineThatDiesMidActivationLosesNothing() throws {
        let cluster = try Cluster(replicas: 3, size: "16M")
        let engineA = try cluster.startEngine()
        let controlB = "unix:" + cluster.scratch.file("b.control")
        let engineB = try Self.startStandby(cluster, control: controlB, environment: ["KEEL_FAULTS": "die-mid-activation"])
        let seed = UInt64.random(in: 1...UInt64(UInt32.max))
        print("mid-activation writer seed \(seed)")
        let beforeLog = cluster.scratch.file("before.log")
        try Self.write(cluster.uri, offset: 0, log: beforeLog, seed: seed)
        #expect(engineA.stop() == 0)
        let activate = try run([Paths.keel, "engine", "activate", "--engine", controlB], timeout: 60)
        #expect(activate.status != 0, "\(activate.stdout)")
        #expect(engineB.stop() == nil || engineB.process.terminationReason == .uncaughtSignal, "B killed itself")

        let controlC = "unix:" + cluster.scratch.file("c.control")
        let engineC = try cluster.startEngine(extra: ["--control", controlC])
        #expect(try EngineTests.status(controlC)["epoch"] as? UInt64 == 3, "one more than B's claim")
        let afterLog = cluster.scratch.file("after.log")
        try Self.write(cluster.uri, offset: 1 << 20, log: afterLog, seed: seed + 1)
        #expect(engineC.stop() == 0)
        try Self.expectEveryWriteOnEveryReplica(cluster, logs: [(beforeLog, seed), (afterLog, seed + 1)])
    }

    /// Its sessions cut (fault point drop-standby-links): an activation claims nothing and says why.
    @Test func aStandbyEngineCutOffFromEveryReplicaClaimsNothing() throws {
        let cluster = try Cluster(replicas: 2, size: "16M")
        let controlA = "unix:" + cluster.scratch.file("a.control")
        let engineA = try cluster.startEngine(extra: ["--control", controlA])
        let controlB = "unix:" + cluster.scratch.file("b.control")
        let engineB = try Self.startStandby(cluster, control: controlB, environment: ["KEEL_FAULTS": "drop-standby-links=0.2"])
        for _ in 0..<100 where !engineB.log.contains("every standby session shut down") { usleep(50_000) }
        #expect(engineB.log.contains("every standby session shut down"))
        try expectOneLineRefusal([Paths.keel, "engine", "activate", "--engine", controlB],
                                 mentioning: ["cannot reach any replica", "nothing was changed"])
        #expect(try EngineTests.status(controlA)["epoch"] as? UInt64 == 1, "A was not fenced")
        let seed = UInt64.random(in: 1...UInt64(UInt32.max))
        print("cut-off writer seed \(seed)")
        try Self.write(cluster.uri, offset: 0, log: cluster.scratch.file("w.log"), seed: seed)
        #expect(engineA.stop() == 0)
    }

    @Test func aStandbyEngineStoodDownLeavesNoTrace() throws {
        let cluster = try Cluster(replicas: 2, size: "16M")
        let controlA = "unix:" + cluster.scratch.file("a.control")
        let controlB = "unix:" + cluster.scratch.file("b.control")
        let engineA = try cluster.startEngine(extra: ["--control", controlA])
        let engineB = try Self.startStandby(cluster, control: controlB)
        #expect(engineB.stop() == 0)
        #expect(engineB.log.contains("stood down: nothing was claimed"), "\(engineB.log)")
        let seed = UInt64.random(in: 1...UInt64(UInt32.max))
        print("stood-down writer seed \(seed)")
        try Self.write(cluster.uri, offset: 0, log: cluster.scratch.file("w.log"), seed: seed)
        #expect(try EngineTests.status(controlA)["epoch"] as? UInt64 == 1)

        // Refusals, one line each.
        try expectOneLineRefusal([Paths.keel, "engine", "activate", "--engine", controlA], mentioning: ["not standing by"])
        try expectOneLineRefusal([Paths.keel, "engine", "serve", "--standby", "--volume", "vol", "--size", "16M",
                                  "--listen", "unix:" + cluster.scratch.file("c.sock")] + cluster.replicaArguments,
                                 mentioning: ["--control"])
        // A replica opens no standby session that could never be claimed, and refuses
        // (never holds) the requests of one whose engine has not claimed.
        let socket = cluster.replicas[0].socketPath!
        let stale = try run(["nbdinfo", "nbd+unix:///vol@standby:1+x?socket=\(socket)"], timeout: 30)
        #expect(stale.status != 0 && stale.stderr.contains("opt_go"), "\(stale.stderr)")
        let early = try run(["nbdcopy", "nbd+unix:///vol@standby:9+x?socket=\(socket)", "null:"], timeout: 30)
        #expect(early.status != 0 && early.stderr.contains("shutdown"), "\(early.stderr)")
        #expect(engineA.stop() == 0)
    }
}
