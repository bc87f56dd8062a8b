import Foundation
import LibNBD
import Testing

/// A replica on TCP with `--tls require`: an engine without credentials
/// cannot claim it (the epoch it keeps is unchanged), one with the node's
/// client certificate or a PSK identity can, and serves fio verify through it.
/// The control APIs of replica and engine require a certificate of the CA.
@Suite(.serialized) struct ReplicaTLSTests {
    let cluster: TestCluster
    var scratch: Scratch { cluster.scratch }
    var state: String { cluster.state }

    init() throws {
        cluster = try TestCluster(nodes: [("replica", ["--ip", "127.0.0.1"]), ("engine", [])])
    }

    func replica(_ name: String, tls: [String]) throws -> KeelServer {
        try KeelServer(["replica", "serve", "--dir", scratch.file(name), "--size", "64M", "--tls", "require"] + tls,
                       scratch: scratch, address: "127.0.0.1:\(try freeTCPPort())")
    }

    /// The exports a replica lists to a client with the engine's certificate: its claimed export carries its epoch.
    func listing(_ replica: KeelServer, _ credentials: LinkTLS.Credentials) throws -> [String] {
        let probe = try NBDClient()
        try probe.setOptionMode(true)
        try probe.requireTLS(credentials)
        let parts = replica.address.split(separator: ":")
        try probe.connect(host: String(parts[0]), port: UInt16(parts[1])!)
        return try probe.listExports()
    }

    func engine(_ replicas: [KeelServer], _ extra: [String]) throws -> Finished {
        try run([Paths.keel, "engine", "serve", "--volume", "vol", "--size", "64M", "--listen",
                 "unix:\(scratch.file("refused.sock"))"] + replicas.flatMap { ["--replica", $0.address] } + extra, timeout: 60)
    }

    func fioVerify(_ engine: KeelServer) throws {
        let fio = try run(["fio", "--name=tls", "--ioengine=nbd", "--uri=\(engine.uri(export: "vol"))", "--rw=randwrite",
                           "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                           "--verify_state_save=0"], timeout: 300)
        #expect(fio.status == 0, "\(fio.stdout)\(fio.stderr)")
    }

    @Test func certificatesGuardTheClaim() throws {
        let replicas = try [replica("r0", tls: ["--tls-certificates", state + "/tls/replica"]),
                            replica("r1", tls: ["--tls-certificates", state + "/tls/replica"])]
        let engineCredentials = LinkTLS.Credentials.certificates(directory: state + "/tls/engine")
        let before = try listing(replicas[0], engineCredentials)

        let plain = try engine(replicas, [])
        #expect(plain.status != 0 && plain.stderr.contains("--replica-tls require"), "\(plain.stderr)")
        #expect(try listing(replicas[0], engineCredentials) == before, "a refused engine changed the replica's epoch")

        // Another cluster's engine: the replica refuses its certificate.
        let rogueCredentials = try cluster.rogue()
        let rogue = try engine(replicas, ["--replica-tls", "require", "--tls-certificates", rogueCredentials])
        #expect(rogue.status != 0 && rogue.stderr.contains("TLS"), "\(rogue.stderr)")
        #expect(try listing(replicas[0], engineCredentials) == before, "a rogue engine changed the replica's epoch")

        // The engine's own listener offers TLS with the same certificates, so its control API requires them.
        let control = "127.0.0.1:\(try freeTCPPort())"
        let engine = try KeelServer(["engine", "serve", "--volume", "vol", "--size", "64M", "--replica-tls", "require",
                                     "--tls", "on", "--tls-certificates", state + "/tls/engine", "--control", control]
                                    + replicas.flatMap { ["--replica", $0.address] }, scratch: scratch)
        try fioVerify(engine)
        let overTLS = try run(["nbdinfo", "--size", "nbds+unix:///vol?socket=\(engine.socketPath!)&tls-certificates=\(state)/tls/engine"])
        #expect(overTLS.status == 0 && overTLS.stdout == "\(64 << 20)\n", "\(overTLS.stderr)")

        try expectOneLineRefusal([Paths.keel, "status", "--engine", control], mentioning: ["cannot reach the engine's control API"])
        try expectOneLineRefusal([Paths.keel, "status", "--engine", control, "--tls-certificates", rogueCredentials],
                                 mentioning: ["cannot reach the engine's control API"])
        let status = try run([Paths.keel, "status", "--engine", control, "--tls-certificates", state + "/tls/engine"])
        #expect(status.status == 0 && status.stdout.contains("healthy"), "\(status.stdout)\(status.stderr)")

        // A replica's control API (data port + 1) refuses a caller without a certificate at the handshake;
        // with one, the call reaches the service (which is not an engine's).
        let replicaParts = replicas[0].address.split(separator: ":")
        let replicaControl = "127.0.0.1:\(Int(replicaParts[1])! + 1)"
        try expectOneLineRefusal([Paths.keel, "status", "--engine", replicaControl], mentioning: ["cannot reach"])
        try expectOneLineRefusal([Paths.keel, "status", "--engine", replicaControl, "--tls-certificates", state + "/tls/engine"],
                                 mentioning: ["refused"])

        #expect(engine.stop() == 0)
        #expect(try listing(replicas[0], engineCredentials).contains { $0.hasPrefix("vol@1+") })
        for replica in replicas { #expect(replica.stop() == 0) }
    }

    /// On a node with its credentials in STATE/tls/NAME (and only those), `--tls require`,
    /// `--replica-tls require` and a control call over TCP need no --tls-certificates.
    @Test func theNodesOwnCredentialsAreTheDefault() throws {
        let node = scratch.file("node-state")
        #expect(try run([Paths.keel, "ca", "init", "--state-dir", node]).status == 0)
        #expect(try run([Paths.keel, "cert", "issue", "node1", "--ip", "127.0.0.1", "--state-dir", node]).status == 0)
        let environment = ["KEEL_STATE_DIR": node]
        let replica = try KeelServer(["replica", "serve", "--dir", scratch.file("d0"), "--size", "64M", "--tls", "require"],
                                     scratch: scratch, address: "127.0.0.1:\(try freeTCPPort())", environment: environment)
        let control = "127.0.0.1:\(try freeTCPPort())"
        let engine = try KeelServer(["engine", "serve", "--volume", "vol", "--size", "64M", "--replica", replica.address,
                                     "--replica-tls", "require", "--tls", "on", "--control", control],
                                    scratch: scratch, environment: environment)
        let status = try run(["/usr/bin/env", "KEEL_STATE_DIR=\(node)", Paths.keel, "status", "--engine", control])
        #expect(status.status == 0 && status.stdout.contains("healthy"), "\(status.stdout)\(status.stderr)")
        try expectOneLineRefusal([Paths.keel, "status", "--engine", control], mentioning: ["cannot reach"])
        #expect(engine.stop() == 0)
        #expect(replica.stop() == 0)
    }

    @Test func preSharedKeysGuardTheClaim() throws {
        let keys = scratch.file("keys.psk")
        #expect(try run(["psktool", "-u", "engine1", "-p", keys]).status == 0)
        let replicas = try [replica("p0", tls: ["--tls-psk", keys])]
        let wrong = scratch.file("wrong.psk")
        #expect(try run(["psktool", "-u", "engine1", "-p", wrong]).status == 0)
        let refused = try engine(replicas, ["--replica-tls", "require", "--tls-psk", wrong, "--tls-username", "engine1"])
        #expect(refused.status != 0 && refused.stderr.contains("TLS"), "\(refused.stderr)")

        let engine = try KeelServer(["engine", "serve", "--volume", "vol", "--size", "64M", "--replica-tls", "require",
                                     "--tls-psk", keys, "--tls-username", "engine1"]
                                    + replicas.flatMap { ["--replica", $0.address] }, scratch: scratch)
        try fioVerify(engine)
        #expect(engine.stop() == 0)
        #expect(replicas[0].log.contains("PSK identity engine1"))
        #expect(try listing(replicas[0], .preSharedKey(file: keys, username: "engine1")).contains { $0.hasPrefix("vol@1+") })
        #expect(replicas[0].stop() == 0)
    }
}
