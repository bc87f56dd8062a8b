import Foundation
import Testing

/// An agent that requires TLS (`keel node serve --tls require`) makes every
/// link between nodes TLS: the engine it starts serves NBD over TLS only and
/// reaches its replicas (which require TLS) over TLS, and the agent's own
/// calls to that engine's control API carry its credentials. Peers: libnbd
/// (nbdinfo) with and without the cluster's certificates.
@Suite(.serialized) struct NodeAgentTLSTests {
    let cluster: TestCluster
    let replicas: [KeelServer]
    let agent: KeelServer
    let address: String

    init() throws {
        let cluster = try TestCluster(nodes: [("n1", ["--ip", "127.0.0.1"]), ("client", [])])
        self.cluster = cluster
        let credentials = cluster.credentials("n1")
        replicas = try (0..<2).map { i in
            try KeelServer(["replica", "serve", "--dir", cluster.scratch.file("r\(i)"), "--size", "16M",
                            "--tls", "require", "--tls-certificates", credentials],
                           scratch: cluster.scratch, address: "127.0.0.1:\(try freeTCPPort())")
        }
        address = "127.0.0.1:\(try freeTCPPort())"
        agent = try KeelServer(["node", "serve", "--name", "n1", "--state-dir", cluster.scratch.file("node"),
                                "--tls", "require", "--tls-certificates", credentials],
                               scratch: cluster.scratch, address: address)
    }

    func node(_ arguments: [String]) throws -> Finished {
        try run([Paths.keel, "node"] + arguments + ["--tls-certificates", cluster.credentials("client")])
    }

    @Test func theEngineItStartsServesAndReachesItsReplicasOverTLSOnly() throws {
        let port = try freeTCPPort()
        let start = ["start-engine", address, "--volume", "vol", "--size", "16M", "--port", "\(port)"]
            + replicas.flatMap { ["--replica", $0.address] }
        let started = try node(start)
        #expect(started.status == 0, "\(started.stderr)\n\(agent.log)")

        let tls = try run(["nbdinfo", "--size", "nbds://127.0.0.1:\(port)/vol?tls-certificates=\(cluster.credentials("client"))"], timeout: 30)
        #expect(tls.status == 0 && tls.stdout == "\(16 << 20)\n", "\(tls.stdout)\(tls.stderr)")
        let plain = try run(["nbdinfo", "--size", "nbd://127.0.0.1:\(port)/vol"], timeout: 30)
        #expect(plain.status != 0, "a plaintext client was served")
        let engineLog = try String(contentsOfFile: cluster.scratch.file("node") + "/log/keel-engine@vol.service.log", encoding: .utf8)
        #expect(engineLog.contains("--replica-tls require"), "\(engineLog)")

        // Starting it again asks its control API (a unix socket that requires TLS) whether it answers: it does, so it stays.
        let again = try node(start + ["--json"])
        #expect(again.stdout.contains("\"already_running\" : true"), "\(again.stdout)\(again.stderr)\n\(agent.log)")
        #expect(try node(["stop-engine", address, "--volume", "vol"]).status == 0)
    }
}
