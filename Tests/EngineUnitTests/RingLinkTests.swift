import Foundation
import LibNBD
import RingLinks
import Testing

/// Found by `Bench/rebuild-soak`: a POLLIN completion handled after the
/// data it announced was gone sent libnbd 1.14 to REPLY.START, where it
/// waits for a reply and issues none of the commands queued meanwhile; with
/// no reply still to come the link stopped until the replica timeout.
@Suite struct RingLinkTests {
    @Test func aStalePollInLeavesTheHandleReadyToIssue() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("keel-ringlink-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let socket = directory.appendingPathComponent("nbdkit.sock").path
        let nbdkit = Process()
        nbdkit.executableURL = URL(fileURLWithPath: "/usr/bin/nbdkit")
        nbdkit.arguments = ["-f", "--exit-with-parent", "-U", socket, "memory", "1M"]
        try nbdkit.run()
        defer {
            // SIGKILL: on SIGTERM nbdkit waits for its connections to close.
            kill(nbdkit.processIdentifier, SIGKILL)
            nbdkit.waitUntilExit()
        }
        for _ in 0..<200 where !FileManager.default.fileExists(atPath: socket) { usleep(50_000) }

        let client = try NBDClient()
        try client.connect(unixSocket: socket)
        var link = RingLink(client: client)
        link.polled(sub: RingLink.pollIn)
        // Not READY: a command queued now would wait for a reply that never comes.
        try #require(client.stateDescription.hasPrefix("READY"), "\(client.stateDescription)")

        // A command queued now goes out and is answered.
        let bytes = [UInt8](repeating: 7, count: 4096)
        let cookie = try bytes.withUnsafeBytes { try client.startWrite($0, at: 0) }
        try client.waitForAll([cookie])
        #expect(try client.read(count: 4096, at: 0) == bytes)
    }
}
