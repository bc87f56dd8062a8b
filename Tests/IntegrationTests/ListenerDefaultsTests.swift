import Foundation
import Syscalls
import Testing

/// Safe defaults: a plaintext listener
/// that other hosts can reach needs an explicit `--tls off` (and is logged),
/// loopback and unix sockets work as before; unix sockets, the state
/// directory and the registry are for their owner only.
@Suite struct ListenerDefaultsTests {
    func expectRefusal(_ arguments: [String], mentioning words: [String]) throws {
        try expectOneLineRefusal([Paths.keel] + arguments, mentioning: words)
    }

    @Test func plaintextBeyondLoopbackNeedsTLSOff() throws {
        let scratch = try Scratch()
        let image = try scratch.image(size: 1 << 20)
        let words = ["reachable from other hosts", "--tls off"]
        try expectRefusal(["export", image, "--listen", "0.0.0.0:10809"], mentioning: ["--listen 0.0.0.0:10809"] + words)
        try expectRefusal(["replica", "serve", "--dir", scratch.file("r"), "--size", "1M", "--listen", "[::]:7001"],
                          mentioning: words)
        try expectRefusal(["replica", "serve", "--dir", scratch.file("r"), "--size", "1M", "--listen", "127.0.0.1:7001",
                           "--control", "0.0.0.0:7002"], mentioning: ["--control"] + words)
        try expectRefusal(["engine", "serve", "--volume", "v", "--size", "1M", "--listen", "0.0.0.0:10809", "--replica", "unix:/nowhere"],
                          mentioning: words)
        try expectRefusal(["snapshot", "export", "v", "s1", "--listen", "0.0.0.0:10809", "--replica", "unix:/nowhere"],
                          mentioning: words)
        try expectRefusal(["replica", "serve", "--dir", scratch.file("r"), "--size", "1M", "--listen", "127.0.0.1:7001",
                           "--control", "0.0.0.0:7002", "--tls", "require", "--tls-psk", "/nowhere.psk"], mentioning: ["--control", "reachable from other hosts"])
        #expect(!FileManager.default.fileExists(atPath: scratch.file("r")), "a refused replica made its directory")

        let (open, port) = try onFreeTCPPort("0.0.0.0") {
            try KeelServer(image: image, scratch: scratch, extra: ["--tls", "off"], address: "0.0.0.0:\($0)")
        }
        let size = try run(["nbdinfo", "--size", "nbd://127.0.0.1:\(port)"])
        #expect(size.stdout == "1048576\n", "\(size.stderr)")
        #expect(open.log.contains("serving in plaintext to other hosts (--tls off)"), "\(open.log)")
        #expect(open.stop() == 0)

        let loopback = try KeelServer(image: image, scratch: scratch, address: "localhost:\(port)")
        #expect(!loopback.log.contains("plaintext"), "\(loopback.log)")
        #expect(loopback.stop() == 0)
    }

    @Test func socketsAndStateAreForTheirOwnerOnly() throws {
        let scratch = try Scratch()
        let replica = try KeelServer(["replica", "serve", "--dir", scratch.file("r"), "--size", "1M"], scratch: scratch)
        #expect(try permissions(replica.socketPath!) == 0o600)
        #expect(try permissions(replica.socketPath! + ".control") == 0o600)
        #expect(try permissions(scratch.file("r")) == 0o700)
        #expect(replica.stop() == 0)

        let state = scratch.file("state")
        #expect(try run([Paths.keel, "volume", "ls", "--state-dir", state]).status == 0)
        #expect(try permissions(state) == 0o700 && permissions(state + "/run") == 0o700 && permissions(state + "/log") == 0o700)
        #expect(try permissions(state + "/registry.sqlite") == 0o600)
    }
}
