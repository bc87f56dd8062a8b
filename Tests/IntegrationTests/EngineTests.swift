import Foundation
import LibNBD
import Testing

/// `keel engine serve` with real `keel replica serve` processes on unix
/// sockets, exercised with fio and libnbd, with replicas killed under load.
@Suite(.serialized) struct EngineTests {
    /// Replicas and an engine of one volume, started for one test.
    final class Cluster {
        let scratch: Scratch
        var replicas: [KeelServer] = []
        var engine: KeelServer?
        let size: String
        let replicaEnvironment: [String: String]

        init(replicas count: Int, size: String = "256M", replicaEnvironment: [String: String] = [:]) throws {
            scratch = try Scratch()
            self.size = size
            self.replicaEnvironment = replicaEnvironment
            for i in 0..<count { replicas.append(try startReplica(i)) }
        }

        func replicaDirectory(_ i: Int) -> String { scratch.file("r\(i)") }

        func startReplica(_ i: Int) throws -> KeelServer {
            try KeelServer(["replica", "serve", "--dir", replicaDirectory(i), "--size", size], scratch: scratch,
                           address: "unix:\(scratch.file("r\(i).sock"))", environment: replicaEnvironment)
        }

        var replicaArguments: [String] { replicas.flatMap { ["--replica", $0.address] } }

        @discardableResult
        func startEngine(extra: [String] = [], environment: [String: String] = [:]) throws -> KeelServer {
            let engine = try KeelServer(["engine", "serve", "--volume", "vol", "--size", size] + replicaArguments + extra,
                                        scratch: scratch, environment: environment)
            self.engine = engine
            return engine
        }

        var uri: String { engine!.uri(export: "vol") }

        func fio(_ arguments: [String], timeout: TimeInterval = 300) throws -> Finished {
            try run(["fio", "--name=engine", "--ioengine=nbd", "--uri=\(uri)", "--verify=crc32c", "--do_verify=1",
                     "--verify_fatal=1", "--verify_state_save=0"] + arguments, timeout: timeout)
        }

        func headsAreIdentical(_ indexes: [Int]) throws -> Bool {
            let sums = try indexes.map { try run(["sha256sum", replicaDirectory($0) + "/layers/head.img"]).stdout.prefix(64) }
            return Set(sums).count == 1
        }

        /// fio random writes with crc32c verification, running while the test breaks things.
        func startFio(depth: Int, seconds: Int) throws -> BackgroundFio {
            try BackgroundFio(uri: uri, output: scratch.file("fio-\(UUID().uuidString.prefix(4)).out"),
                              depth: depth, seconds: seconds)
        }

        func kill9Replica(_ i: Int) {
            kill(replicas[i].process.processIdentifier, SIGKILL)
            replicas[i].process.waitUntilExit()
        }
    }

    @Test func threeReplicasFioVerifyAndIdenticalHeads() throws {
        let cluster = try Cluster(replicas: 3)
        try cluster.startEngine()
        let fio = try cluster.fio(["--rw=randwrite", "--bsrange=4k-256k", "--iodepth=32", "--size=128M"])
        #expect(fio.status == 0, "\(fio.stdout)\(fio.stderr)")
        #expect(cluster.engine!.stop() == 0)
        for replica in cluster.replicas { #expect(replica.stop() == 0) }
        #expect(try cluster.headsAreIdentical([0, 1, 2]))
    }

    /// `keel status --json` of an engine started with `--control`.
    static func status(_ control: String) throws -> [String: Any] {
        let result = try run([Paths.keel, "status", "--engine", control, "--json"], timeout: 30)
        guard result.status == 0 else { throw TestFailure("keel status failed: \(result.stderr)") }
        return try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any]
    }

    /// The issue's rebuild story: a replica killed under fio verify, the volume
    /// degraded, a fresh replica added during further writes and rebuilt,
    /// the dead one removed, and all replicas identical in the end.
    @Test func replicaKilledThenReplacedOnline() throws {
        let cluster = try Cluster(replicas: 3)
        let control = "unix:" + cluster.scratch.file("engine.control")
        let engine = try cluster.startEngine(extra: ["--control", control])
        #expect(try Self.status(control)["health"] as? String == "healthy")
        let fio = try cluster.startFio(depth: 32, seconds: 5)
        usleep(1_500_000)
        cluster.kill9Replica(1)
        fio.expectSucceeded()
        #expect(engine.log.contains("volume degraded: 2 of 3 replicas healthy"))
        var status = try Self.status(control)
        #expect(status["health"] as? String == "degraded")
        #expect(Self.modes(status) == ["RW", "ERR", "RW"])
        let io = status["io"] as! [String: Any]
        #expect((io["writes"] as? Int ?? 0) > 1000 && io["errors"] as? Int == 0)
        let table = try run([Paths.keel, "status", "--engine", control])
        #expect(table.stdout.hasPrefix("volume vol: degraded"), "\(table.stdout)")

        // A fresh replica joins while fio writes and verifies.
        let fresh = try cluster.startReplica(3)
        cluster.replicas.append(fresh)
        let moreWrites = try cluster.startFio(depth: 16, seconds: 6)
        usleep(1_000_000)
        let add = try run([Paths.keel, "replica", "add", "--engine", control, fresh.address, "--json"], timeout: 120)
        #expect(add.status == 0, "\(add.stderr)")
        let progress = add.stdout.split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
        #expect(progress.last?["mode"] as? String == "RW", "\(add.stdout)")
        #expect(progress.last?["rebuild_progress"] as? Double == 1)
        moreWrites.expectSucceeded()
        #expect(engine.log.contains("rebuilt: now RW"))
        #expect(Self.modes(try Self.status(control)) == ["RW", "ERR", "RW", "RW"])

        let remove = try run([Paths.keel, "replica", "rm", "--engine", control, cluster.replicas[1].address])
        #expect(remove.status == 0 && remove.stdout.contains("healthy"), "\(remove.stdout)\(remove.stderr)")
        status = try Self.status(control)
        #expect(status["health"] as? String == "healthy" && Self.modes(status) == ["RW", "RW", "RW"])

        #expect(engine.stop() == 0)
        for i in [0, 2, 3] { #expect(cluster.replicas[i].stop() == 0) }
        #expect(try cluster.headsAreIdentical([0, 2, 3]))
    }

    static func modes(_ status: [String: Any]) -> [String] {
        (status["replicas"] as! [[String: Any]]).map { $0["mode"] as! String }
    }

    @Test func allReplicasGoneMeansEIONeverSilentSuccess() throws {
        let cluster = try Cluster(replicas: 2, size: "16M")
        try cluster.startEngine()
        let client = try NBDClient()
        try client.connect(uri: cluster.uri)
        try client.write([1, 2, 3], at: 0)
        cluster.kill9Replica(0)
        cluster.kill9Replica(1)
        var failures = 0
        for i in 0..<4 {
            do { try client.write([UInt8](repeating: 9, count: 4096), at: UInt64(i) * 4096) } catch let error as NBDClientError {
                #expect(error.errno == EIO)
                failures += 1
            }
        }
        #expect(failures == 4)
        #expect(cluster.engine!.log.contains("faulted"))
    }

    /// A second engine claims the replicas: the first engine's next write
    /// fails with EIO, and none of its writes lands after the claim.
    @Test func aSecondEngineFencesTheFirst() throws {
        let cluster = try Cluster(replicas: 2, size: "16M")
        let first = try cluster.startEngine()
        let old = try NBDClient()
        try old.connect(uri: first.uri(export: "vol"))
        try old.write([UInt8](repeating: 1, count: 4096), at: 0, flags: .fua)

        let second = try KeelServer(["engine", "serve", "--volume", "vol", "--size", "16M"] + cluster.replicaArguments,
                                    scratch: cluster.scratch)
        let new = try NBDClient()
        try new.connect(uri: second.uri(export: "vol"))
        do {
            try old.write([UInt8](repeating: 2, count: 4096), at: 0)
            Issue.record("the fenced engine acknowledged a write")
        } catch let error as NBDClientError {
            #expect(error.errno == EIO)
        }
        #expect(try new.read(count: 4096, at: 0) == [UInt8](repeating: 1, count: 4096))
        try new.write([UInt8](repeating: 3, count: 4096), at: 4096, flags: .fua)
        #expect(second.stop() == 0)
        #expect(second.log.contains("epoch 2"))
        #expect(first.stop() == 0)
        for replica in cluster.replicas { #expect(replica.stop() == 0) }
        #expect(try cluster.headsAreIdentical([0, 1]))
    }

    /// kill -9 the engine during writes and start another: every write it
    /// acknowledged reads back, and the replicas are made identical by
    /// copying only the regions that were dirty, not the whole volume.
    @Test func engineKilledDuringWritesConvergesWithoutAFullCopy() throws {
        let cluster = try Cluster(replicas: 3)
        let first = try cluster.startEngine()
        // Random writes in the first 32 MiB, in flight when the engine dies.
        let background = try cluster.startFio(depth: 32, seconds: 30)
        let client = try NBDClient()
        try client.connect(uri: first.uri(export: "vol"))
        var acknowledged: [UInt64: [UInt8]] = [:]
        for i in 0..<160 {
            let offset = (64 << 20) + UInt64(i) * 65536
            let data = Pattern().bytes(at: offset, count: 65536)
            try client.write(data, at: offset)
            acknowledged[offset] = data
        }
        kill(first.process.processIdentifier, SIGKILL)
        first.process.waitUntilExit()
        background.process.terminate()
        background.process.waitUntilExit()

        let second = try cluster.startEngine()
        // "made the replicas identical: copied N of SIZE bytes, …"
        let copied = second.log.components(separatedBy: "identical: copied ").dropFirst().first
            .flatMap { UInt64($0.prefix { $0.isNumber }) }
        #expect(copied != nil && copied! > 0 && copied! <= 64 << 20, "\(second.log)")
        let reader = try NBDClient()
        try reader.connect(uri: second.uri(export: "vol"))
        for (offset, data) in acknowledged { #expect(try reader.read(count: data.count, at: offset) == data) }
        #expect(second.stop() == 0)
        for replica in cluster.replicas { #expect(replica.stop() == 0) }
        #expect(try cluster.headsAreIdentical([0, 1, 2]))
    }

    /// On a kernel without the NBD driver, `keel frontend serve` says how to load it, in one line;
    /// the engine it was pointed at goes on and counts its clients.
    @Test func frontendWithoutTheDriverSaysHowToLoadIt() throws {
        guard !FileManager.default.fileExists(atPath: "/sys/module/nbd") else { return }
        let cluster = try Cluster(replicas: 1, size: "16M")
        let control = "unix:" + cluster.scratch.file("engine.control")
        let engine = try cluster.startEngine(extra: ["--control", control])
        let frontend = try run([Paths.keel, "frontend", "serve", "--volume", "vol", "--engine", engine.address])
        #expect(frontend.status != 0 && frontend.stderr.contains("modprobe nbd"), "\(frontend.stderr)")
        #expect(frontend.stderr.split(separator: "\n").count == 1)
        #expect(try Self.status(control)["health"] as? String == "healthy")
        #expect(try Self.status(control)["client_connections"] as? Int == 0)
        let client = try NBDClient()
        try client.connect(uri: engine.uri(export: "vol"))
        #expect(try Self.status(control)["client_connections"] as? Int == 1)
    }

    @Test func badCallsGetOneLineAndWriteNothing() throws {
        let cluster = try Cluster(replicas: 1, size: "16M")
        let replica = cluster.replicas[0].address
        func expectFailure(_ arguments: [String], mentioning word: String) throws {
            let result = try run([Paths.keel, "engine", "serve", "--volume", "vol", "--listen",
                                  "unix:\(cluster.scratch.file("e.sock"))"] + arguments, timeout: 30)
            #expect(result.status != 0)
            #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
            #expect(result.stderr.contains(word), "\(result.stderr)")
        }
        try expectFailure(["--size", "32M", "--replica", replica], mentioning: "holds 16777216 bytes")
        try expectFailure(["--size", "16M", "--replica", "unix:\(cluster.scratch.file("none.sock"))"], mentioning: "cannot reach")
        try expectFailure(["--size", "16M", "--replica", "127.0.0.1:1"], mentioning: "cannot reach")
        let notReplica = try KeelServer(image: try cluster.scratch.image(size: 16 << 20), scratch: cluster.scratch)
        try expectFailure(["--size", "16M", "--replica", notReplica.address], mentioning: "not a Keel replica")
        try expectFailure(["--size", "16M"], mentioning: "--replica")
        try expectFailure(["--size", "16M", "--replica", replica, "--frontend", "kernel"], mentioning: "--frontend")
        // Claimed by a newer epoch already.
        let engine = try cluster.startEngine(extra: ["--epoch", "10"])
        #expect(engine.stop() == 0)
        try expectFailure(["--size", "16M", "--replica", replica, "--epoch", "5"], mentioning: "not newer than epoch 10")
        // The failed starts changed nothing: epoch 10 still owns the replica.
        let probe = try NBDClient()
        try probe.setOptionMode(true)
        try probe.connect(unixSocket: cluster.replicas[0].socketPath!)
        #expect(try probe.listExports().first?.hasPrefix("vol@10+") == true)
    }
}

/// An fio verify job in the background; `expectSucceeded` waits (bounded) and checks it.
final class BackgroundFio {
    let process = Process()
    let output: String

    init(uri: String, output: String, depth: Int, seconds: Int) throws {
        self.output = output
        process.executableURL = URL(fileURLWithPath: "/usr/bin/fio")
        process.arguments = ["--name=background", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bs=4k",
                             "--iodepth=\(depth)", "--size=32M", "--verify=crc32c", "--do_verify=1",
                             "--verify_fatal=1", "--verify_state_save=0", "--time_based", "--runtime=\(seconds)",
                             "--output=\(output)"]
        try process.run()
    }

    func expectSucceeded() {
        let deadline = Date().addingTimeInterval(120)
        while process.isRunning && Date() < deadline { usleep(50_000) }
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
        let report = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
        #expect(process.terminationStatus == 0 && report.contains("err= 0"), "\(report)")
    }

    deinit { if process.isRunning { process.terminate() } }
}
