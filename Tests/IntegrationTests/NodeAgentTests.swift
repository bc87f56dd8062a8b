import ControlAPI
import Foundation
import LibNBD
import Testing
import Volumes

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

    /// A migration's engine B through the agent (engine A runs elsewhere): it stands by with
    /// its sessions open and claims nothing, A writes on; activated, it serves with the next
    /// epoch, which fences A, and it is the node's engine of the volume.
    @Test func aStandbyEngineStandsByThroughTheAgentAndTakesOverWhenActivated() throws {
        try cluster.startEngine()
        let engineA = try NBDClient()
        try engineA.connect(uri: cluster.uri)
        try engineA.write(Array(repeating: 5, count: 4096), at: 0)
        try engineA.flush()
        let port = try freeTCPPort()
        let request = Keel_Control_V1_StartEngineRequest.with {
            $0.volume = "vol"
            $0.size = 16 << 20
            $0.replicas = cluster.replicas.map(\.address)
            $0.port = UInt32(port)
        }
        let vol = Keel_Control_V1_StopEngineRequest.with { $0.volume = "vol" }
        let started = try callNode(address, doing: "start engine B") { try await $0.startStandbyEngine(request) }
        #expect(started.address == "127.0.0.1:\(port)")
        let state = try callNode(address, doing: "say whether it stands by") { try await $0.standbyEngineState(vol) }
        #expect(state.standby && state.standbyLost.isEmpty, "\(state)")
        #expect(throws: KeelError.self) { try callNode(self.address, doing: "start engine B") { try await $0.startStandbyEngine(request) } }

        try engineA.write(Array(repeating: 6, count: 4096), at: 4096)
        try engineA.flush()
        let activated = try callNode(address, doing: "activate engine B") { try await $0.activateStandbyEngine(vol) }
        #expect(activated.epoch > 0)
        let engineB = try NBDClient()
        try engineB.connect(uri: "nbd://127.0.0.1:\(port)/vol")
        #expect(try engineB.read(count: 8192, at: 0) == Array(repeating: 5, count: 4096) + Array(repeating: 6, count: 4096))
        try engineB.write(Array(repeating: 7, count: 4096), at: 0)
        try engineB.flush()
        #expect(throws: (any Error).self) {
            try engineA.write(Array(repeating: 8, count: 4096), at: 0)
            try engineA.flush()
        }
        #expect(try engineB.read(count: 4096, at: 0) == Array(repeating: 7, count: 4096))
        try engineB.shutdown()

        let daemons = try health()["daemons"] as? [[String: Any]] ?? []
        #expect(daemons.contains { $0["kind"] as? String == "engine" && $0["running"] as? Bool == true }, "\(daemons)")
        do {
            _ = try callNode(address, doing: "start engine B") { try await $0.startStandbyEngine(request) }
            Issue.record("a standby engine beside the node's engine of the volume should be refused")
        } catch let error as KeelError {
            #expect(error.message.contains("runs on n1: engine B goes on another node"), "\(error)")
        }
        #expect(try keel(["stop-engine", address, "--volume", "vol"]).status == 0)
        do {
            _ = try callNode(address, doing: "say whether it stands by") { try await $0.standbyEngineState(vol) }
            Issue.record("no engine stands by now")
        } catch let error as KeelError {
            #expect(error.message.contains("no engine of vol stands by on n1"), "\(error)")
        }
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
