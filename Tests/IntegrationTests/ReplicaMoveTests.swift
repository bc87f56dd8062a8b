import Foundation
import Testing

/// `keel volume move` with its replicas on nodes that are network namespaces,
/// each with its own agent (`keel node serve`), all started here: the volume's
/// engine runs on this host, started for the move (the volume is detached), and
/// a generation-stamped writer works through it while the replicas move.
@Suite(.serialized) struct ReplicaMoveTests {
    let scratch: Scratch
    let state: String

    init() throws {
        scratch = try Scratch()
        state = scratch.file("state")
    }

    /// A node: a namespace behind a veth pair and its agent, known to this host's registry by `name`.
    final class TestNode {
        let name: String
        let network: TestNetwork
        let agent: KeelServer
        let stateDirectory: String

        init(_ name: String, scratch: Scratch) throws {
            self.name = name
            network = try TestNetwork()
            stateDirectory = scratch.file("node-\(name)")
            do {
                agent = try KeelServer(["ip", "netns", "exec", network.namespace, Paths.keel, "node", "serve", "--name", name,
                                        "--state-dir", stateDirectory, "--tls", "off"],
                                       scratch: scratch, address: "\(network.namespaceAddress):7800", executable: "/usr/sbin/ip")
            } catch {
                network.remove()
                throw error
            }
        }

        /// Replicas this node's agent runs (by their data directories).
        var runningReplicas: [String] {
            let found = (try? run(["pgrep", "-f", "replica serve --dir \(stateDirectory)/placed/"]).stdout) ?? ""
            return found.split(separator: "\n").map(String.init)
        }

        func remove() {
            _ = agent.stop()
            // Replicas the agent started outlive it: they go with their namespace's test.
            _ = try? run(["pkill", "-9", "-f", "replica serve --dir \(stateDirectory)/"])
            network.remove()
        }
    }

    func keel(_ arguments: [String], environment: [String: String] = [:]) throws -> Finished {
        try run([Paths.keel] + arguments + ["--state-dir", state], timeout: 300, environment: environment)
    }

    func json(_ arguments: [String]) throws -> [String: Any] {
        let result = try keel(arguments + ["--json"])
        return try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any] ?? [:]
    }

    func nodes(_ names: [String]) throws -> [TestNode] {
        var made: [TestNode] = []
        do {
            for name in names {
                let node = try TestNode(name, scratch: scratch)
                made.append(node)
                let added = try keel(["node", "add", name, node.agent.address])
                guard added.status == 0 else { throw TestFailure("node add \(name): \(added.stderr)") }
            }
        } catch {
            for node in made { node.remove() }
            throw error
        }
        return made
    }

    /// `keel volume move` running in the background (its engine inherits `environment`).
    func startMove(_ arguments: [String], environment: [String: String]) throws -> (Process, String) {
        let process = Process()
        let log = scratch.file("move-\(UUID().uuidString.prefix(6)).log")
        FileManager.default.createFile(atPath: log, contents: nil)
        process.executableURL = URL(fileURLWithPath: Paths.keel)
        process.arguments = ["volume", "move"] + arguments + ["--state-dir", state]
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        return (process, log)
    }

    func waitForExit(_ process: Process, seconds: Double) -> Int32? {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(100_000) }
        if process.isRunning { process.terminate(); return nil }
        return process.terminationStatus
    }

    func migration() throws -> [String: Any] { try json(["migrate", "status", "vol"]) }

    /// Until the move copies (a share of its first replica done), or a minute passes.
    func waitUntilCopying(percentAtLeast: Int = 5) throws {
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            let status = try migration()
            if (status["phase"] as? String)?.hasPrefix("copying") == true, (status["percent"] as? Int ?? 0) >= percentAtLeast { return }
            usleep(100_000)
        }
        throw TestFailure("the move did not start copying within a minute: \(try migration())")
    }

    /// A volume of two replicas on this host moving to nodes n1 and n2, copies slowed by `slowRebuild` s a region,
    /// once it copies; the move's process and its log.
    func startSlowMoveOfTwoReplicas(slowRebuild: Double) throws -> (Process, String) {
        try #require(try keel(["volume", "create", "vol", "--size", "64M", "--replicas", "2"]).status == 0)
        let started = try startMove(["vol", "--replica-node", "n1", "--replica-node", "n2"],
                                    environment: ["KEEL_FAULTS": "slow-rebuild=\(slowRebuild)"])
        try waitUntilCopying()
        return started
    }

    /// What the test's volume runs goes: its engine, its replicas here and on the nodes (which the nodes' removal stops anyway).
    func removeVolume() {
        _ = try? keel(["volume", "detach", "vol"])
        _ = try? keel(["volume", "rm", "vol", "--force"])
    }

    func replicas() throws -> [[String: Any]] { try json(["volume", "show", "vol"])["replicas"] as? [[String: Any]] ?? [] }

    // MARK: - Tests

    @Test func allThreeReplicasMoveToThreeOtherNodesUnderStampedWritesAndNothingIsLost() throws {
        let nodes = try nodes(["n1", "n2", "n3", "n4", "n5", "n6"])
        defer { removeVolume(); for node in nodes { node.remove() } }
        let created = try keel(["volume", "create", "vol", "--size", "64M", "--replicas", "3",
                                "--replica-node", "n1", "--replica-node", "n2", "--replica-node", "n3"])
        try #require(created.status == 0, "\(created.stderr)")
        let volumeID = try json(["volume", "show", "vol"])["id"] as? String ?? ""

        // Slowed copies: the writer's seconds fall inside the move.
        let (move, moveLog) = try startMove(["vol", "--replica-node", "n4", "--replica-node", "n5", "--replica-node", "n6", "--json"],
                                            environment: ["KEEL_FAULTS": "slow-rebuild=0.1"])
        let seed = UInt64.random(in: 1...UInt64(UInt32.max))
        print("move writer seed \(seed)")
        let log = scratch.file("stamp.log")
        let socket = state + "/run/vol.nbd"
        let write = try run(["/usr/bin/python3", FreshnessTests.stamp, "write", "--uri", "nbd+unix:///?socket=\(socket)",
                             "--blocks", "4096", "--seconds", "6", "--depth", "8", "--retry-connect", "--flush-every", "64",
                             "--seed", "\(seed)", "--log", log, "--json"], timeout: 120)
        let moved = waitForExit(move, seconds: 240)
        let moveOutput = (try? String(contentsOfFile: moveLog, encoding: .utf8)) ?? ""
        #expect(write.status == 0, "seed \(seed): \(write.stdout)\(write.stderr)")
        let written = (try? JSONSerialization.jsonObject(with: Data(write.stdout.utf8))) as? [String: Any]
        #expect((written?["acked"] as? Int ?? 0) > 500, "the writer wrote during the move: \(write.stdout)")
        #expect(moved == 0, "\(moveOutput)")
        #expect(moveOutput.contains("\"migration_status\":\"migrating_attachable\""), "\(moveOutput)")
        #expect(moveOutput.contains("\"phase\":\"copying 3 replicas\""), "the three are rebuilt in one pass: \(moveOutput)")

        let status = try migration()
        #expect(status["migration_status"] as? String == "success" && status["percent"] as? Int == 100, "\(status)")
        let now = try replicas()
        #expect(now.compactMap { $0["node"] as? String } == ["n4", "n5", "n6"], "\(now)")
        #expect(now.allSatisfy { $0["role"] as? String == "member" }, "\(now)")
        for node in nodes.prefix(3) { #expect(node.runningReplicas.isEmpty, "\(node.name) still runs \(node.runningReplicas)") }
        for node in nodes.suffix(3) { #expect(node.runningReplicas.count == 1, "\(node.name) runs \(node.runningReplicas)") }
        let listed = try keel(["volume", "ls", "--migration-status", "success"])
        #expect(listed.stdout.split(separator: "\n").count == 2, "one row per volume: \(listed.stdout)")

        // The engine was started for the move and is gone: the replicas' files are read as they are.
        let heads = nodes.suffix(3).map { node -> String in
            let placed = node.stateDirectory + "/placed/" + volumeID
            let directory = ((try? FileManager.default.contentsOfDirectory(atPath: placed)) ?? []).first ?? "missing"
            return placed + "/" + directory + "/layers/head.img"
        }
        try FreshnessTests.expectFreshAndIdentical(heads, log: log, seed: seed)
    }

    @Test func aCancelledMoveRemovesTheNewReplicasAndKeepsTheOldOnes() throws {
        let nodes = try nodes(["n1", "n2"])
        defer { removeVolume(); for node in nodes { node.remove() } }
        let (move, moveLog) = try startSlowMoveOfTwoReplicas(slowRebuild: 0.2)
        let before = try replicas().filter { $0["local"] as? Bool == true }  // the old set: on this host
        let cancelled = try keel(["volume", "move", "vol", "--cancel"])
        #expect(cancelled.status == 0 && cancelled.stdout.contains("cancelled"), "\(cancelled.stdout)\(cancelled.stderr)")
        #expect(waitForExit(move, seconds: 120) == 0, "\((try? String(contentsOfFile: moveLog, encoding: .utf8)) ?? "")")

        let status = try migration()
        #expect(status["migration_status"] as? String == "error" && status["phase"] as? String == "cancelled", "\(status)")
        let after = try replicas()
        #expect(after.compactMap { $0["address"] as? String } == before.compactMap { $0["address"] as? String }, "\(after)")
        #expect(after.allSatisfy { $0["role"] as? String == "member" && $0["running"] as? Bool == true }, "\(after)")
        for node in nodes { #expect(node.runningReplicas.isEmpty, "\(node.name) still runs \(node.runningReplicas)") }
        let again = try keel(["volume", "move", "vol", "--cancel"])
        #expect(again.status != 0 && again.stderr.contains("no move of vol is running"), "\(again.stderr)")
    }

    @Test func aNewReplicaKilledMidwayEndsTheMoveInErrorWithTheVolumeUnharmed() throws {
        let nodes = try nodes(["n1", "n2"])
        defer { removeVolume(); for node in nodes { node.remove() } }
        let (move, moveLog) = try startSlowMoveOfTwoReplicas(slowRebuild: 0.2)
        let before = try replicas().filter { $0["local"] as? Bool == true }  // the old set: on this host
        let victim = nodes[0].runningReplicas
        try #require(victim.count == 1, "\(victim)")
        kill(pid_t(victim[0])!, SIGKILL)
        let exit = waitForExit(move, seconds: 120)
        let output = (try? String(contentsOfFile: moveLog, encoding: .utf8)) ?? ""
        #expect(exit != 0 && output.contains("failed"), "\(output)")

        let status = try migration()
        #expect(status["migration_status"] as? String == "error", "\(status)")
        #expect((status["error"] as? String ?? "").contains("new replica"), "\(status)")
        let after = try replicas()
        #expect(after.compactMap { $0["address"] as? String } == before.compactMap { $0["address"] as? String }, "\(after)")
        for node in nodes { #expect(node.runningReplicas.isEmpty, "\(node.name) still runs \(node.runningReplicas)") }
    }

    @Test func anOldReplicaKilledMidwayIsDroppedAndTheMoveFinishes() throws {
        let nodes = try nodes(["n1", "n2"])
        defer { removeVolume(); for node in nodes { node.remove() } }
        let (move, moveLog) = try startSlowMoveOfTwoReplicas(slowRebuild: 0.1)
        // The first old replica is the copy's source: the copy goes on from the other.
        let old = try run(["pgrep", "-f", "replica serve --dir \(state)/replicas/vol/r0 "]).stdout
        try #require(pid_t(old.trimmingCharacters(in: .whitespacesAndNewlines)) != nil, "\(old)")
        kill(pid_t(old.trimmingCharacters(in: .whitespacesAndNewlines))!, SIGKILL)
        let exit = waitForExit(move, seconds: 120)
        #expect(exit == 0, "\((try? String(contentsOfFile: moveLog, encoding: .utf8)) ?? "")")
        let status = try migration()
        #expect(status["migration_status"] as? String == "success", "\(status)")
        #expect(try replicas().compactMap { $0["node"] as? String } == ["n1", "n2"])
        #expect(!FileManager.default.fileExists(atPath: state + "/replicas/vol/r0"))
    }

    @Test func aBadMoveIsOneLineAndChangesNothing() throws {
        try #require(try keel(["volume", "create", "vol", "--size", "16M", "--replicas", "1"]).status == 0)
        defer { removeVolume() }
        let base = [Paths.keel, "volume", "move", "vol", "--state-dir", state]
        try expectOneLineRefusal(base, mentioning: ["--replica-node"])
        try expectOneLineRefusal(base + ["--replica-node", "nosuch"], mentioning: ["no node named nosuch"])
        try expectOneLineRefusal(base + ["--replica", "127.0.0.1:\(try freeTCPPort())"], mentioning: ["cannot reach replica"])
        try expectOneLineRefusal(base + ["--replica", try replicas().first?["address"] as? String ?? ""], mentioning: ["nothing to move"])
        try expectOneLineRefusal([Paths.keel, "volume", "move", "nosuch", "--replica-node", "x", "--state-dir", state],
                                 mentioning: ["no volume named"])
        let status = try migration()
        #expect(status["migration_status"] as? String == "none", "\(status)")
    }
}
