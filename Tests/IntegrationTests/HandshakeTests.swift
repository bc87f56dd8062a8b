import Foundation
import LibNBD
import Testing

/// What libnbd learns about an export during the handshake.
@Suite(.serialized) struct HandshakeTests {
    @Test func advertisesSizeFlagsAndBlockSizes() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 64 << 20), scratch: scratch)
        let client = try NBDClient()
        try client.addMetaContext("base:allocation")
        try client.connect(uri: server.uri)
        #expect(try client.size == 64 << 20)
        #expect(client.structuredRepliesNegotiated)
        #expect(client.canMetaContext("base:allocation"))
        #expect(!client.isReadOnly)
        #expect(client.canFlush && client.canFUA && client.canTrim && client.canZero)
        #expect(client.canFastZero && client.canCache && client.canMultiConn)
        let (minimum, preferred, maximum) = try client.blockSizes()
        #expect(minimum == 1 && preferred == 4096 && maximum == 32 << 20)
        try client.shutdown()
    }

    @Test func namedExportAndDefaultExport() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 1 << 20), scratch: scratch, extra: ["--name", "disk"])
        for name in ["", "disk"] {
            let client = try NBDClient()
            try client.setExportName(name)
            try client.connect(unixSocket: server.socketPath!)
            #expect(try client.size == 1 << 20)
        }
        let stranger = try NBDClient()
        try stranger.setExportName("other")
        #expect(throws: NBDClientError.self) { try stranger.connect(unixSocket: server.socketPath!) }

        let lister = try NBDClient()
        try lister.setOptionMode(true)
        try lister.connect(uri: server.uri)
        #expect(try lister.listExports() == ["disk"])
        try lister.abortOptions()
    }

    @Test func simpleRepliesWhenStructuredRepliesAreNotRequested() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 1 << 20), scratch: scratch)
        let client = try NBDClient()
        try client.requestStructuredReplies(false)
        try client.connect(uri: server.uri)
        #expect(!client.structuredRepliesNegotiated)
        let data = Pattern().bytes(at: 8192, count: 8192)
        try client.write(data, at: 8192)
        #expect(try client.read(count: 8192, at: 8192) == data)
        #expect(try client.read(count: 100, at: 8193) == Array(data[1..<101]))
    }

    @Test func tcpListener() throws {
        let scratch = try Scratch()
        let image = try scratch.image(size: 1 << 20)
        let (server, port) = try onFreeTCPPort { try KeelServer(image: image, scratch: scratch, address: "127.0.0.1:\($0)") }
        let client = try NBDClient()
        try client.connect(host: "127.0.0.1", port: UInt16(port))
        #expect(try client.size == 1 << 20)
        #expect(server.stop() == 0)
    }
}
