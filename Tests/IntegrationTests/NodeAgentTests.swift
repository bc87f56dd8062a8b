import Foundation
import LibNBD
import Testing

/// `keel node serve` on loopback with real replicas: engines started and
/// stopped through the agent's API, its health, and the refusals.
@Suite(.serialized) struct NodeAgentTests {
    let cluster: EngineTests.Cluster
    let agent: KeelServer
    let address: String

    init() throws {
        cluster = try EngineTests.Cluster(replicas: 2, size: "16M")
        address = "127.0.0.1:\(try freeTCPPort())"
        agent = try KeelServer(["node", "serve", "--name", "n1", "--state-dir", cluster.scratch.file("node")],
                               scratch: cluster.scratch, address: address)
    }

    func keel(_ arguments: [String]) throws -> Finished { try run([Paths.keel, "node"] + arguments) }

    func health() throws -> [String: Any] {
        let result = try keel(["health", address, "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        return try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any] ?? [:]
    }

    func startEngine(_ extra: [String] = [], port: Int) throws -> Finished {
        try keel(["start-engine", address, "--volume", "vol", "--size", "16M", "--port", "\(port)"]
                 + cluster.replicaArguments + extra)
    }

    @Test func anEngineStartedThroughTheAgentServesAndStops() throws {
        #expect(try health()["name"] as? String == "n1")
        #expect((try health()["daemons"] as? [Any])?.isEmpty == true)
        let port = try freeTCPPort()
        let started = try startEngine(port: port)
        #expect(started.status == 0, "\(started.stderr)\n\(agent.log)")
        #expect(started.stdout == "127.0.0.1:\(port)\n")

        let client = try NBDClient()
        try client.connect(uri: "nbd://127.0.0.1:\(port)/vol")
        #expect(try client.size == 16 << 20)
        try client.write(Array(repeating: 7, count: 4096), at: 4096)
        #expect(try client.read(count: 4096, at: 4096) == Array(repeating: 7, count: 4096))
        try client.shutdown()

        let daemons = try health()["daemons"] as? [[String: Any]] ?? []
        #expect(daemons.count == 1 && daemons[0]["kind"] as? String == "engine" && daemons[0]["running"] as? Bool == true)
        let again = try keel(["start-engine", address, "--volume", "vol", "--size", "16M", "--port", "\(port)", "--json"]
                             + cluster.replicaArguments)
        #expect(again.stdout.contains("\"already_running\" : true"), "\(again.stdout)")

        let stopped = try keel(["stop-engine", address, "--volume", "vol"])
        #expect(stopped.status == 0, "\(stopped.stderr)")
        let after = try health()["daemons"] as? [[String: Any]] ?? []
        #expect(after.allSatisfy { $0["running"] as? Bool == false })
    }

    /// A stopped (hung) engine answers nobody: a start kills it and starts
    /// another, which claims the replicas anew; so does a start that asks for it.
    @Test func aHungEngineIsKilledAndStartedAgain() throws {
        let port = try freeTCPPort()
        #expect(try startEngine(port: port).status == 0)
        let client = try NBDClient()
        try client.connect(uri: "nbd://127.0.0.1:\(port)/vol")
        try client.write(Array(repeating: 9, count: 4096), at: 0)
        try client.flush()
        try client.shutdown()
        let first = try enginePid()
        kill(first, SIGSTOP)
        defer { kill(first, SIGKILL) }

        let restarted = try startEngine(["--json"], port: port)
        #expect(restarted.status == 0, "\(restarted.stderr)\n\(agent.log)")
        #expect(restarted.stdout.contains("\"already_running\" : false"), "\(restarted.stdout)")
        let second = try enginePid()
        #expect(second != first)
        let reader = try NBDClient()
        try reader.connect(uri: "nbd://127.0.0.1:\(port)/vol")
        #expect(try reader.read(count: 4096, at: 0) == Array(repeating: 9, count: 4096))
        try reader.shutdown()

        let asked = try startEngine(["--restart-running", "--json"], port: port)
        #expect(asked.stdout.contains("\"already_running\" : false"), "\(asked.stdout)\(asked.stderr)")
        #expect(try enginePid() != second)
        #expect(try keel(["stop-engine", address, "--volume", "vol"]).status == 0)
    }

    /// The pid of the one engine of `vol` this test's agent runs.
    func enginePid() throws -> pid_t {
        let found = try run(["/usr/bin/pgrep", "-f", "engine serve --volume vol .*\(cluster.scratch.file("node"))"])
        let pids = found.stdout.split(separator: "\n").compactMap { pid_t($0) }
        try #require(pids.count == 1, "engines: \(found.stdout)")
        return pids[0]
    }

    @Test func anEngineThatCannotStartIsOneLineWithItsReason() throws {
        let result = try keel(["start-engine", address, "--volume", "vol", "--size", "32M", "--port", "\(try freeTCPPort())"]
                              + cluster.replicaArguments)
        #expect(result.status != 0)
        #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
        #expect(result.stderr.contains("did not start") && result.stderr.contains("holds 16777216 bytes"), "\(result.stderr)")
        #expect((try health()["daemons"] as? [[String: Any]] ?? []).allSatisfy { $0["running"] as? Bool == false })
    }

    @Test func anUnreachableNodeIsOneLine() throws {
        let result = try keel(["health", "127.0.0.1:\(try freeTCPPort())"])
        #expect(result.status != 0)
        #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
        #expect(result.stderr.contains("cannot reach the node agent"), "\(result.stderr)")
    }

    @Test func anAgentBeyondLoopbackWithoutTLSIsRefused() throws {
        let result = try keel(["serve", "--listen", "10.255.255.1:7800", "--state-dir", cluster.scratch.file("n2")])
        #expect(result.status != 0)
        #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
        #expect(result.stderr.contains("--tls"), "\(result.stderr)")
    }
}
