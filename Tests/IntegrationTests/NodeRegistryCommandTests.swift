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

    @Test func anEngineNodeThatIsNotKnownIsOneLineAndNoVolume() throws {
        try expectRefusal(["volume", "create", "vol", "--size", "16M", "--engine-node", "nosuch"] + replicaArguments,
                          mentioning: ["no node named nosuch", "keel node add"])
        #expect((try json(["volume", "ls"]) as? [Any])?.isEmpty == true)
    }

    @Test func anEngineElsewhereNeedsReplicasOverTCP() throws {
        #expect(try keel(["node", "add", "node-b", address]).status == 0)
        try expectRefusal(["volume", "create", "vol", "--size", "16M", "--engine-node", "node-b", "--replicas", "2"],
                          mentioning: ["--replica HOST:PORT"])
        #expect((try json(["volume", "ls"]) as? [Any])?.isEmpty == true)
    }
}
