import Foundation
import Testing

/// `keel node add/ls/rm` and `keel volume create --engine-node` with a real
/// node agent on loopback: the nodes this one knows, and the refusals.
@Suite(.serialized) struct NodeRegistryCommandTests {
    let scratch: Scratch
    let replicas: [KeelServer]
    let agent: KeelServer
    let address: String
    let state: String

    init() throws {
        let scratch = try Scratch()
        self.scratch = scratch
        // An engine on another node reaches its replicas over TCP.
        replicas = try (0..<2).map { i in
            try KeelServer(["replica", "serve", "--dir", scratch.file("r\(i)"), "--size", "16M"], scratch: scratch,
                           address: "127.0.0.1:\(try freeTCPPort())")
        }
        address = "127.0.0.1:\(try freeTCPPort())"
        agent = try KeelServer(["node", "serve", "--name", "node-b", "--state-dir", scratch.file("agent")],
                               scratch: scratch, address: address)
        state = scratch.file("state")
    }

    func keel(_ arguments: [String]) throws -> Finished {
        try run([Paths.keel] + arguments + ["--state-dir", state])
    }

    func json(_ arguments: [String]) throws -> Any {
        try JSONSerialization.jsonObject(with: Data(try keel(arguments + ["--json"]).stdout.utf8))
    }

    func expectRefusal(_ arguments: [String], mentioning words: [String]) throws {
        try expectOneLineRefusal([Paths.keel] + arguments + ["--state-dir", state], mentioning: words)
    }

    func knownNodes() throws -> [[String: Any]] { try json(["node", "ls"]) as? [[String: Any]] ?? [] }

    var replicaArguments: [String] { replicas.flatMap { ["--replica", $0.address] } }

    @Test func aNodeIsAddedListedAndRemoved() throws {
        let added = try json(["node", "add", "node-b", address]) as? [String: Any]
        #expect(added?["address"] as? String == address)
        #expect(added?["agent_name"] as? String == "node-b")

        let nodes = try knownNodes()
        #expect(nodes.count == 2, "\(nodes)")
        #expect(nodes.first?["address"] as? String == "this host")
        let b = nodes.first { $0["name"] as? String == "node-b" }
        #expect(b?["reachable"] as? Bool == true && b?["address"] as? String == address, "\(nodes)")

        try expectRefusal(["node", "add", "node-b", address], mentioning: ["node-b"])
        #expect(try keel(["node", "rm", "node-b"]).status == 0)
        #expect(try knownNodes().count == 1)
    }

    @Test func aNodeWhoseAgentDoesNotAnswerIsNotAdded() throws {
        try expectRefusal(["node", "add", "node-c", "127.0.0.1:\(try freeTCPPort())"], mentioning: ["cannot reach"])
        #expect(try knownNodes().count == 1)
    }

    @Test func aNodeThatStopsAnsweringIsListedUnreachable() throws {
        #expect(try keel(["node", "add", "node-b", address]).status == 0)
        agent.stop()
        let b = try knownNodes().first { $0["name"] as? String == "node-b" }
        #expect(b?["reachable"] as? Bool == false, "\(String(describing: b))")
        #expect((b?["error"] as? String)?.isEmpty == false)
    }

    @Test func aVolumeWithItsEngineOnAnotherNodeKeepsThatNodeInUse() throws {
        #expect(try keel(["node", "add", "node-b", address]).status == 0)
        let created = try json(["volume", "create", "vol", "--size", "16M", "--engine-node", "node-b"] + replicaArguments)
            as? [String: Any]
        #expect(created?["engine_nodes"] as? [String] == ["node-b"], "\(String(describing: created))")
        #expect((created?["engine_port"] as? Int ?? 0) >= 10810)
        #expect(created?["state"] as? String == "detached")

        try expectRefusal(["node", "rm", "node-b"], mentioning: ["vol"])
        let shown = try keel(["volume", "show", "vol"])
        #expect(shown.stdout.contains("engine on node-b"), "\(shown.stdout)\(shown.stderr)")

        #expect(try keel(["volume", "rm", "vol"]).status == 0)
        #expect(try keel(["node", "rm", "node-b"]).status == 0)
    }

    /// keel migrate of a volume whose engine runs on engine nodes: one line each saying what to do, no record.
    @Test func aMigrationBetweenEngineNodesRefusesWhatItCannotDo() throws {
        #expect(try keel(["node", "add", "node-b", address]).status == 0)
        #expect(try keel(["volume", "create", "vol", "--size", "16M", "--engine-node", "node-b"] + replicaArguments).status == 0)
        try expectRefusal(["migrate", "start", "vol"], mentioning: ["engine nodes (node-b)", "--to NODE"])
        try expectRefusal(["migrate", "start", "vol", "--to", "nosuch"], mentioning: ["no node named nosuch", "keel node add"])
        try expectRefusal(["migrate", "start", "vol", "--to", "node-b", "--binary", Paths.keel], mentioning: ["--binary", "agent"])
        try expectRefusal(["migrate", "start", "vol", "--to", "node-b"], mentioning: ["not connected to an engine", "keel volume attach vol --mapper"])
        let status = try keel(["migrate", "status", "vol"])
        #expect(status.stdout.contains("migration_status none"), "\(status.stdout)\(status.stderr)")
        #expect(try keel(["volume", "rm", "vol"]).status == 0)
    }

    @Test func anEngineNodeThatIsNotKnownIsOneLineAndNoVolume() throws {
        try expectRefusal(["volume", "create", "vol", "--size", "16M", "--engine-node", "nosuch"] + replicaArguments,
                          mentioning: ["no node named nosuch", "keel node add"])
        #expect((try json(["volume", "ls"]) as? [Any])?.isEmpty == true)
    }

    /// `--replica-node`: the agent starts the replica there, on a port it
    /// picks, under the volume's identity; rm removes it there with its data.
    @Test func aReplicaPlacedOnANodeIsStartedAndRemovedThroughItsAgent() throws {
        #expect(try keel(["node", "add", "node-b", address]).status == 0)
        let created = try json(["volume", "create", "vol", "--size", "16M", "--replicas", "2", "--replica-node", "node-b"])
            as? [String: Any]
        let listed = created?["replicas"] as? [[String: Any]] ?? []
        try #require(listed.count == 2, "\(String(describing: created))")
        #expect(listed[0]["local"] as? Bool == true)
        #expect(listed[1]["node"] as? String == "node-b", "\(listed)")
        let placed = listed[1]["address"] as? String ?? ""
        #expect(placed.hasPrefix("127.0.0.1:"), "\(placed)")

        let daemons = try agentDaemons()
        #expect(daemons.contains { $0["kind"] as? String == "replica" && $0["running"] as? Bool == true }, "\(daemons)")
        let shown = try keel(["volume", "show", "vol"])
        #expect(shown.stdout.contains("on node node-b"), "\(shown.stdout)")
        try expectRefusal(["node", "rm", "node-b"], mentioning: ["vol"])

        #expect(try keel(["volume", "rm", "vol"]).status == 0)
        #expect(try agentDaemons().allSatisfy { $0["running"] as? Bool == false })
        let placedData = (try? FileManager.default.contentsOfDirectory(atPath: scratch.file("agent/placed"))) ?? []
        #expect(placedData.isEmpty, "\(placedData)")
    }

    @Test func aReplicaOnAnUnknownNodeIsOneLineAndNothingIsLeft() throws {
        try expectRefusal(["volume", "create", "vol", "--size", "16M", "--replica-node", "nosuch"],
                          mentioning: ["no node named nosuch", "keel node add"])
        #expect((try json(["volume", "ls"]) as? [Any])?.isEmpty == true)
        #expect(!FileManager.default.fileExists(atPath: state + "/replicas/vol"))
    }

    @Test func anEngineElsewhereWithEveryReplicaPlacedOnNodes() throws {
        #expect(try keel(["node", "add", "node-b", address]).status == 0)
        let created = try json(["volume", "create", "vol", "--size", "16M", "--replicas", "1", "--replica-node", "node-b",
                                "--engine-node", "node-b"]) as? [String: Any]
        #expect((created?["replicas"] as? [[String: Any]])?.first?["node"] as? String == "node-b", "\(String(describing: created))")
        try expectRefusal(["volume", "create", "two", "--size", "16M", "--replicas", "2", "--replica-node", "node-b",
                           "--engine-node", "node-b"], mentioning: ["--replica-node"])
        #expect(try keel(["volume", "rm", "vol"]).status == 0)
    }

    func agentDaemons() throws -> [[String: Any]] {
        let health = try run([Paths.keel, "node", "health", address, "--json"])
        let object = try JSONSerialization.jsonObject(with: Data(health.stdout.utf8)) as? [String: Any]
        return object?["daemons"] as? [[String: Any]] ?? []
    }

    @Test func anEngineElsewhereNeedsReplicasOverTCP() throws {
        #expect(try keel(["node", "add", "node-b", address]).status == 0)
        try expectRefusal(["volume", "create", "vol", "--size", "16M", "--engine-node", "node-b", "--replicas", "2"],
                          mentioning: ["--replica HOST:PORT"])
        #expect((try json(["volume", "ls"]) as? [Any])?.isEmpty == true)
    }
}
