import Foundation
import Testing

/// `keel export --tls require` against independent TLS clients: libnbd
/// (nbdinfo, nbdcopy) and qemu-img, with the cluster CA's certificates and
/// with a psktool key file. Plaintext, a wrong key, a client certificate
/// from another CA and an expired one are refused, each with the error the
/// client shows and the reason in the server's log.
@Suite(.serialized) struct NBDOverTLSTests {
    let cluster: TestCluster
    var scratch: Scratch { cluster.scratch }
    var state: String { cluster.state }

    init() throws {
        cluster = try TestCluster(nodes: [("server", ["--ip", "127.0.0.1"]), ("client", [])])
    }

    var serverCredentials: String { cluster.credentials("server") }
    var clientCredentials: String { cluster.credentials("client") }

    /// A TCP loopback export (where TLS matters: TCP is what crosses hosts) of a fresh image.
    func export(_ tls: [String]) throws -> KeelServer {
        let image = try scratch.image(size: 16 << 20)
        return try KeelServer(image: image, scratch: scratch, extra: ["--tls", "require"] + tls,
                              address: "127.0.0.1:\(try freeTCPPort())")
    }

    func tlsURI(_ server: KeelServer, _ query: String, user: String? = nil) -> String {
        "nbds://\(user.map { $0 + "@" } ?? "")\(server.address)/?\(query)"
    }

    @Test func certificatesServeLibnbdAndRefuseStrangers() throws {
        let server = try export(["--tls-certificates", serverCredentials])
        let uri = tlsURI(server, "tls-certificates=\(clientCredentials)")

        let info = try run(["nbdinfo", uri], timeout: 30)
        #expect(info.status == 0 && info.stdout.contains("with TLS"), "\(info.stderr)")
        let source = scratch.file("source.img"), back = scratch.file("back.img")
        FileManager.default.createFile(atPath: source, contents: Data(Pattern().bytes(at: 0, count: 8 << 20)))
        #expect(try run(["nbdcopy", source, uri], timeout: 60).status == 0)
        #expect(try run(["nbdcopy", uri, back], timeout: 60).status == 0)
        let copied = try Data(contentsOf: URL(fileURLWithPath: back))
        #expect(copied.prefix(8 << 20) == Data(Pattern().bytes(at: 0, count: 8 << 20)))

        // Plaintext: every option but STARTTLS is refused, the export list too.
        let plain = try run(["nbdinfo", "nbd://\(server.address)/"], timeout: 30)
        #expect(plain.status != 0 && plain.stderr.contains("server replied with error to opt_go"), "\(plain.stderr)")
        let list = try run(["nbdinfo", "--list", "nbd://\(server.address)/"], timeout: 30)
        #expect(list.status != 0 && list.stderr.contains("server replied with error to list"), "\(list.stderr)")

        // Another cluster's client.
        let rogue = try cluster.rogue()
        let refused = try run(["nbdinfo", tlsURI(server, "tls-certificates=\(rogue)")], timeout: 30)
        #expect(refused.status != 0 && refused.stderr.contains("TLS fatal alert"), "\(refused.stderr)")
        try poll("the server's reason", seconds: 20) { server.log.contains("issuer is unknown") }

        let expired = try expiredClient()
        let late = try run(["nbdinfo", tlsURI(server, "tls-certificates=\(expired)")], timeout: 30)
        #expect(late.status != 0 && late.stderr.contains("TLS fatal alert"), "\(late.stderr)")
        try poll("the server's reason", seconds: 20) { server.log.contains("expired certificate") }

        // A client with no certificate at all.
        let bare = scratch.file("bare")
        try FileManager.default.createDirectory(atPath: bare, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: clientCredentials + "/ca-cert.pem", toPath: bare + "/ca-cert.pem")
        #expect(try run(["nbdinfo", tlsURI(server, "tls-certificates=\(bare)")], timeout: 30).status != 0)
        #expect(server.stop() == 0)
    }

    /// A client certificate this cluster's CA signed, valid in January 2020 only (certtool, with the CA's key).
    func expiredClient() throws -> String {
        let directory = scratch.file("expired")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let template = scratch.file("expired.tmpl")
        try "cn = \"expired\"\nactivation_date = \"2020-01-01 00:00:00\"\nexpiration_date = \"2020-02-01 00:00:00\"\ntls_www_client\nsigning_key\n"
            .write(toFile: template, atomically: true, encoding: .utf8)
        #expect(try run(["certtool", "--generate-privkey", "--key-type", "ecdsa", "--outfile", directory + "/client-key.pem"]).status == 0)
        let signed = try run(["certtool", "--generate-certificate", "--load-privkey", directory + "/client-key.pem",
                              "--load-ca-certificate", state + "/ca/ca-cert.pem", "--load-ca-privkey", state + "/ca/ca-key.pem",
                              "--template", template, "--outfile", directory + "/client-cert.pem"])
        #expect(signed.status == 0, "\(signed.stderr)")
        try FileManager.default.copyItem(atPath: state + "/ca/ca-cert.pem", toPath: directory + "/ca-cert.pem")
        return directory
    }

    @Test func preSharedKeysServeLibnbdAndQemu() throws {
        let keys = scratch.file("keys")
        try FileManager.default.createDirectory(atPath: keys, withIntermediateDirectories: true)
        #expect(try run(["psktool", "-u", "alice", "-p", keys + "/keys.psk"]).status == 0)
        let server = try export(["--tls-psk", keys + "/keys.psk"])

        let info = try run(["nbdinfo", "--size", tlsURI(server, "tls-psk-file=\(keys)/keys.psk", user: "alice")], timeout: 30)
        #expect(info.status == 0 && info.stdout == "\(16 << 20)\n", "\(info.stderr)")
        try poll("the identity in the log", seconds: 20) { server.log.contains("PSK identity alice") }

        let source = scratch.file("source.img")
        FileManager.default.createFile(atPath: source, contents: Data(Pattern().bytes(at: 0, count: 4 << 20)))
        #expect(try run(["nbdcopy", source, tlsURI(server, "tls-psk-file=\(keys)/keys.psk", user: "alice")], timeout: 60).status == 0)

        // qemu-img, a second TLS client: reads back what libnbd wrote.
        let qemu = try run(["qemu-img", "convert", "-O", "raw",
                            "--object", "tls-creds-psk,id=tls0,dir=\(keys),username=alice,endpoint=client",
                            "--image-opts", "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port=\(server.address.split(separator: ":").last!),file.tls-creds=tls0",
                            scratch.file("qemu.img")], timeout: 60)
        #expect(qemu.status == 0, "\(qemu.stderr)")
        let read = try Data(contentsOf: URL(fileURLWithPath: scratch.file("qemu.img")))
        #expect(read.prefix(4 << 20) == Data(Pattern().bytes(at: 0, count: 4 << 20)))

        // The same identity with another key.
        let wrong = scratch.file("wrong.psk")
        #expect(try run(["psktool", "-u", "alice", "-p", wrong]).status == 0)
        let refused = try run(["nbdinfo", tlsURI(server, "tls-psk-file=\(wrong)", user: "alice")], timeout: 30)
        #expect(refused.status != 0 && refused.stderr.contains("gnutls_handshake"), "\(refused.stderr)")
        #expect(server.stop() == 0)
    }

    @Test func qemuImgWithCertificates() throws {
        let server = try export(["--tls-certificates", serverCredentials])
        let port = server.address.split(separator: ":").last!
        let qemu = try run(["qemu-img", "info", "--output=json",
                            "--object", "tls-creds-x509,id=tls0,dir=\(clientCredentials),endpoint=client",
                            "--image-opts", "driver=nbd,host=127.0.0.1,port=\(port),tls-creds=tls0,tls-hostname=127.0.0.1"], timeout: 30)
        #expect(qemu.status == 0 && qemu.stdout.contains("\"virtual-size\": \(16 << 20)"), "\(qemu.stdout)\(qemu.stderr)")
        #expect(server.stop() == 0)
    }

    @Test func badTLSOptionsAreOneLineRefusals() throws {
        let image = try scratch.image(size: 1 << 20)
        try expectOneLineRefusal([Paths.keel, "export", image, "--listen", "127.0.0.1:1", "--tls", "require"],
                                 mentioning: ["--tls-certificates", "--tls-psk"])
        try expectOneLineRefusal([Paths.keel, "export", image, "--listen", "127.0.0.1:1", "--tls", "on",
                                  "--tls-psk", scratch.file("none.psk")], mentioning: ["none.psk"])
        try expectOneLineRefusal([Paths.keel, "export", image, "--listen", "127.0.0.1:1", "--tls", "require",
                                  "--tls-certificates", scratch.file("nowhere")], mentioning: ["nowhere"])
        try expectOneLineRefusal([Paths.keel, "export", image, "--listen", "127.0.0.1:1",
                                  "--tls-certificates", serverCredentials], mentioning: ["--tls on", "--tls require"])
    }
}
