import Foundation
import LibNBD
import Testing

/// Replicas that stop answering: NBD has no timeout, the engine has one.
@Suite(.serialized) struct ReplicaTimeoutTests {
    /// A frozen replica process (SIGSTOP) keeps its socket open but answers nothing.
    @Test func aFrozenReplicaIsFailedWithinTheTimeout() throws {
        let cluster = try EngineTests.Cluster(replicas: 3, size: "64M")
        let engine = try cluster.startEngine(extra: ["--replica-timeout", "1"])
        let fio = try cluster.startFio(depth: 16, seconds: 5)
        usleep(1_000_000)
        kill(cluster.replicas[2].process.processIdentifier, SIGSTOP)
        defer { kill(cluster.replicas[2].process.processIdentifier, SIGCONT) }
        fio.expectSucceeded()
        #expect(engine.log.contains("no answer within 1 s"), "\(engine.log)")
        #expect(engine.log.contains("volume degraded: 2 of 3 replicas healthy"))
    }

    /// The replica runs in a network namespace behind a veth pair; taking the
    /// link down leaves its TCP connection silent, not closed.
    @Test func aReplicaBehindACutLinkIsFailedAndIOGoesOn() throws {
        let net = try TestNetwork()
        defer { net.remove() }
        let cluster = try EngineTests.Cluster(replicas: 2, size: "64M")
        let remote = try KeelServer(["ip", "netns", "exec", net.namespace, Paths.keel, "replica", "serve",
                                     "--dir", cluster.scratch.file("remote"), "--size", "64M", "--tls", "off"],
                                    scratch: cluster.scratch, address: "\(net.namespaceAddress):7001",
                                    executable: "/usr/sbin/ip")
        defer { remote.stop() }
        cluster.replicas.append(remote)
        let engine = try cluster.startEngine(extra: ["--replica-timeout", "2"])
        let fio = try cluster.startFio(depth: 16, seconds: 6)
        usleep(1_500_000)
        try net.cutLink()
        fio.expectSucceeded()
        // The data path or the keeper's next call, whichever waits out the timeout first, fails it.
        #expect(engine.log.contains("no answer within 2 s") || engine.log.contains("RPC timed out"), "\(engine.log)")
        #expect(engine.log.contains("volume degraded: 2 of 3 replicas healthy"))
    }
}

/// A network namespace joined to this one by a veth pair, made by the test
/// and removed after it. Addresses are in 10.231.0.0/16, on these links only.
final class TestNetwork {
    let namespace: String
    let hostLink: String
    let hostAddress: String
    let namespaceAddress: String

    init() throws {
        let id = Int.random(in: 1...250)
        namespace = "keel-test-\(id)-\(UUID().uuidString.prefix(4))"
        hostLink = "kh\(id)\(UUID().uuidString.prefix(4))"
        let peer = "kn\(id)\(UUID().uuidString.prefix(4))"
        hostAddress = "10.231.\(id).1"
        namespaceAddress = "10.231.\(id).2"
        for command in [
            ["ip", "netns", "add", namespace],
            ["ip", "link", "add", hostLink, "type", "veth", "peer", "name", peer],
            ["ip", "link", "set", peer, "netns", namespace],
            ["ip", "addr", "add", "\(hostAddress)/24", "dev", hostLink],
            ["ip", "link", "set", hostLink, "up"],
            ["ip", "netns", "exec", namespace, "ip", "addr", "add", "\(namespaceAddress)/24", "dev", peer],
            ["ip", "netns", "exec", namespace, "ip", "link", "set", peer, "up"],
            ["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up"],
        ] {
            let result = try run(command, timeout: 20)
            guard result.status == 0 else {
                remove()
                throw TestFailure("\(command.joined(separator: " ")) failed: \(result.stderr)")
            }
        }
    }

    func cutLink() throws {
        let result = try run(["ip", "link", "set", hostLink, "down"], timeout: 20)
        guard result.status == 0 else { throw TestFailure("cannot take \(hostLink) down: \(result.stderr)") }
    }

    func remove() {
        _ = try? run(["ip", "link", "del", hostLink], timeout: 20)
        _ = try? run(["ip", "netns", "del", namespace], timeout: 20)
    }
}
