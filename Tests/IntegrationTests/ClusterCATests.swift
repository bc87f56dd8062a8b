import Foundation
import Testing

/// `keel ca init` and `keel cert issue`: the files, their modes, and that
/// independent TLS stacks accept them: certtool verifies the chain, nbdkit
/// (GnuTLS) serves with a node's server credentials and checks clients'
/// certificates, and libnbd (nbdinfo) and qemu-img connect with a node's
/// client credentials; a client from another CA, and one without TLS, are
/// refused.
@Suite(.serialized) struct ClusterCATests {
    let scratch: Scratch
    let state: String

    init() throws {
        scratch = try Scratch()
        state = scratch.file("state")
    }

    func keel(_ arguments: [String], state: String? = nil) throws -> Finished {
        try run([Paths.keel] + arguments + ["--state-dir", state ?? self.state])
    }

    @Test func credentialsWorkWithGnuTLSPeers() throws {
        #expect(try keel(["ca", "init"]).status == 0)
        let issued = try keel(["cert", "issue", "node1", "--ip", "127.0.0.1", "--json"])
        #expect(issued.status == 0, "\(issued.stderr)")
        let report = try JSONSerialization.jsonObject(with: Data(issued.stdout.utf8)) as! [String: Any]
        #expect(report["subject"] as? String == "CN=node1,O=Keel")
        #expect(!issued.stdout.contains("PRIVATE KEY"))
        #expect(try keel(["cert", "issue", "client1"]).status == 0)

        let ca = state + "/ca", server = state + "/tls/node1", client = state + "/tls/client1"
        #expect(try permissions(ca) == 0o700 && permissions(ca + "/ca-key.pem") == 0o600 && permissions(ca + "/ca-cert.pem") == 0o644)
        #expect(try permissions(server) == 0o700 && permissions(server + "/server-key.pem") == 0o600 && permissions(server + "/client-key.pem") == 0o600)
        let names = try FileManager.default.contentsOfDirectory(atPath: server).sorted()
        #expect(names == ["ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem"])

        let verified = try run(["certtool", "--verify", "--load-ca-certificate", ca + "/ca-cert.pem",
                                "--infile", server + "/server-cert.pem"])
        #expect(verified.status == 0 && verified.stdout.contains("Verified"), "\(verified.stdout)\(verified.stderr)")

        // Another cluster's CA and client.
        let other = scratch.file("other")
        #expect(try keel(["ca", "init"], state: other).status == 0)
        #expect(try keel(["cert", "issue", "rogue"], state: other).status == 0)

        let socket = scratch.file("nbdkit.sock")
        let nbdkit = Process()
        nbdkit.executableURL = URL(fileURLWithPath: "/usr/bin/nbdkit")
        nbdkit.arguments = ["-f", "--exit-with-parent", "--tls=require", "--tls-certificates=\(server)", "--tls-verify-peer",
                            "-U", socket, "memory", "1M"]
        nbdkit.standardError = FileHandle.nullDevice
        try nbdkit.run()
        defer {
            // SIGKILL: nbdkit waits for its connections on SIGTERM, and a refused client may leave one behind.
            kill(nbdkit.processIdentifier, SIGKILL)
            try? poll("nbdkit to exit", seconds: 20) { !nbdkit.isRunning }
        }
        try poll("nbdkit's socket", seconds: 20) { FileManager.default.fileExists(atPath: socket) }

        func nbdinfo(_ credentials: String?) throws -> Finished {
            let uri = credentials.map { "nbds+unix:///?socket=\(socket)&tls-certificates=\($0)" } ?? "nbd+unix:///?socket=\(socket)"
            return try run(["nbdinfo", "--size", uri], timeout: 30)
        }
        let size = try nbdinfo(client)
        #expect(size.status == 0 && size.stdout == "1048576\n", "\(size.stderr)")
        let rogue = try nbdinfo(other + "/tls/rogue")
        #expect(rogue.status != 0 && rogue.stderr.contains("gnutls"), "\(rogue.stderr)")
        let plain = try nbdinfo(nil)
        #expect(plain.status != 0 && plain.stderr.contains("TLS"), "\(plain.stderr)")

        // qemu (its own GnuTLS client) checks the server's DNS name, node1.
        let qemu = try run(["qemu-img", "info", "--output=json",
                            "--object", "tls-creds-x509,id=tls0,dir=\(client),endpoint=client",
                            "--image-opts", "driver=nbd,path=\(socket),tls-creds=tls0,tls-hostname=node1"], timeout: 30)
        #expect(qemu.status == 0 && qemu.stdout.contains("\"virtual-size\": 1048576"), "\(qemu.stdout)\(qemu.stderr)")
        let wrongName = try run(["qemu-img", "info",
                                 "--object", "tls-creds-x509,id=tls0,dir=\(client),endpoint=client",
                                 "--image-opts", "driver=nbd,path=\(socket),tls-creds=tls0,tls-hostname=node9"], timeout: 30)
        #expect(wrongName.status != 0, "a certificate for node1 passed as node9")
    }

    func expectRefusal(_ arguments: [String], mentioning words: [String]) throws {
        try expectOneLineRefusal([Paths.keel] + arguments + ["--state-dir", state], mentioning: words)
    }

    @Test func badCallsAreRefusedAndLeaveNothingHalfMade() throws {
        try expectRefusal(["cert", "issue", "node1"], mentioning: ["no CA", "keel ca init"])
        #expect(!FileManager.default.fileExists(atPath: state + "/tls/node1"))
        #expect(try keel(["ca", "init"]).status == 0)
        let caCert = try String(contentsOfFile: state + "/ca/ca-cert.pem", encoding: .utf8)
        try expectRefusal(["ca", "init"], mentioning: ["already exists"])
        #expect(try String(contentsOfFile: state + "/ca/ca-cert.pem", encoding: .utf8) == caCert)

        #expect(try keel(["cert", "issue", "node1"]).status == 0)
        let nodeCert = try String(contentsOfFile: state + "/tls/node1/server-cert.pem", encoding: .utf8)
        try expectRefusal(["cert", "issue", "node1"], mentioning: ["already exists"])
        #expect(try String(contentsOfFile: state + "/tls/node1/server-cert.pem", encoding: .utf8) == nodeCert)
        try expectRefusal(["cert", "issue", "node2", "--ip", "10.0.0"], mentioning: ["not an IPv4 or IPv6 address"])
        try expectRefusal(["cert", "issue", "node2", "--days", "0"], mentioning: ["--days"])
        try expectRefusal(["cert", "issue", "a/b"], mentioning: ["no '/'"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: state + "/tls") == ["node1"])
    }
}
