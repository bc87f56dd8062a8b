import Foundation
import Testing

/// A cluster CA in a scratch state directory and node credentials issued by
/// it (`keel ca init`, `keel cert issue`), for the TLS suites.
struct TestCluster {
    let scratch: Scratch
    let state: String

    /// `nodes`: each node's name and its `keel cert issue` options (e.g. `--ip 127.0.0.1`).
    init(nodes: [(name: String, options: [String])]) throws {
        scratch = try Scratch()
        state = scratch.file("state")
        #expect(try keel(["ca", "init"]).status == 0)
        for node in nodes { #expect(try keel(["cert", "issue", node.name] + node.options).status == 0) }
    }

    func keel(_ arguments: [String], state: String? = nil) throws -> Finished {
        try run([Paths.keel] + arguments + ["--state-dir", state ?? self.state])
    }

    /// A node's credentials directory, STATE/tls/NAME.
    func credentials(_ name: String) -> String { state + "/tls/" + name }

    /// Credentials from another cluster's CA that trust this cluster's CA,
    /// so that only the server's own check can refuse them.
    func rogue() throws -> String {
        let other = scratch.file("other")
        #expect(try keel(["ca", "init"], state: other).status == 0)
        #expect(try keel(["cert", "issue", "rogue"], state: other).status == 0)
        let rogue = other + "/tls/rogue"
        try FileManager.default.removeItem(atPath: rogue + "/ca-cert.pem")
        try FileManager.default.copyItem(atPath: state + "/ca/ca-cert.pem", toPath: rogue + "/ca-cert.pem")
        return rogue
    }
}
