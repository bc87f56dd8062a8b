import Foundation
import LibNBD
import Testing

/// Reads, writes and the other commands through libnbd, checked against a
/// model of what the image must contain.
@Suite(.serialized) struct DataPathTests {
    @Test func unalignedWritesAndReadsMatchAModel() throws {
        let size = 4 << 20
        let scratch = try Scratch()
        let image = try scratch.image(size: size)
        let server = try KeelServer(image: image, scratch: scratch)
        let client = try NBDClient()
        try client.connect(uri: server.uri)

        var model = [UInt8](repeating: 0, count: size)
        var rng = SystemRandomNumberGenerator()
        for i in 0..<300 {
            let length = Int.random(in: 1...20_000, using: &rng)
            let offset = Int.random(in: 0...(size - length), using: &rng)
            let data = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) }
            try client.write(data, at: UInt64(offset), flags: i % 7 == 0 ? .fua : [])
            model.replaceSubrange(offset..<offset + length, with: data)
            let probe = Int.random(in: 0...(size - 5000), using: &rng)
            #expect(try client.read(count: 5000, at: UInt64(probe)) == Array(model[probe..<probe + 5000]))
        }
        try client.flush()
        #expect(try client.read(count: size, at: 0) == model)
        try client.shutdown()
        #expect(server.stop() == 0)
        #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: image))) == model)
    }

    /// Partial writes to one block, all in flight at once, across connections:
    /// read-modify-write must not lose any of them.
    @Test func concurrentPartialWritesToOneBlockAllSurvive() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 1 << 20), scratch: scratch)
        let clients = try (0..<2).map { _ in try NBDClient() }
        for client in clients { try client.connect(uri: server.uri) }
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { bytes.deallocate() }
        for i in 0..<4096 { bytes[i] = UInt8(truncatingIfNeeded: i * 7 + 1) }
        var cookies: [(NBDClient, Int64)] = []
        // Every 16-byte piece of blocks 10 and 11 (the second straddles nothing: pure RMW).
        for piece in stride(from: 0, to: 4096, by: 16) {
            let client = clients[(piece / 16) % 2]
            for block in [10, 11] {
                let region = UnsafeRawBufferPointer(rebasing: bytes[piece..<piece + 16])
                cookies.append((client, try client.startWrite(region, at: UInt64(block * 4096 + piece))))
            }
        }
        let deadline = Date().addingTimeInterval(60)
        for (client, cookie) in cookies {
            while try !client.isComplete(cookie) {
                #expect(Date() < deadline)
                try client.poll(milliseconds: 100)
            }
        }
        let expected = Array(UnsafeRawBufferPointer(bytes))
        #expect(try clients[0].read(count: 4096, at: 10 * 4096) == expected)
        #expect(try clients[1].read(count: 4096, at: 11 * 4096) == expected)
    }

    /// A maximum-size read and write: replies far larger than the socket
    /// buffer go out in many partial sends, and buffers come from outside the arena.
    @Test func thirtyTwoMebibyteRequests() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 64 << 20), scratch: scratch)
        let client = try NBDClient()
        try client.connect(uri: server.uri)
        let data = Pattern().bytes(at: 4096, count: 32 << 20)
        try client.write(data, at: 4096)
        #expect(try client.read(count: 32 << 20, at: 4096) == data)
        let simple = try NBDClient()
        try simple.requestStructuredReplies(false)
        try simple.connect(uri: server.uri)
        #expect(try simple.read(count: 32 << 20, at: 4096) == data)
    }

    @Test func zeroTrimCacheAndFlush() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 4 << 20), scratch: scratch)
        let client = try NBDClient()
        try client.connect(uri: server.uri)
        let data = Pattern().bytes(at: 0, count: 1 << 20)
        try client.write(data, at: 0)

        try client.zero(count: 10_000, at: 1000)                     // unaligned, may punch
        try client.zero(count: 8192, at: 65536, flags: .noHole)     // aligned, allocated
        try client.zero(count: 4096, at: 131072, flags: [.fastZero, .fua])
        var expected = data
        expected.replaceSubrange(1000..<11000, with: repeatElement(0, count: 10_000))
        expected.replaceSubrange(65536..<73728, with: repeatElement(0, count: 8192))
        expected.replaceSubrange(131072..<135168, with: repeatElement(0, count: 4096))
        #expect(try client.read(count: 1 << 20, at: 0) == expected)

        try client.trim(count: 1 << 20, at: 2 << 20)
        try client.trim(count: 5000, at: 123, flags: .fua)
        try client.cache(count: 1 << 20, at: 0)
        try client.flush()
        #expect(try client.read(count: 1 << 20, at: 0)[200_000..<300_000] == expected[200_000..<300_000])
    }

    @Test func blockStatusReportsHolesAndData() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 8 << 20), scratch: scratch)
        let client = try NBDClient()
        try client.addMetaContext("base:allocation")
        try client.connect(uri: server.uri)
        try client.write(Pattern().bytes(at: 1 << 20, count: 1 << 20), at: 1 << 20)
        let extents = try client.blockStatus(count: 8 << 20, at: 0)
        #expect(extents.first == .init(length: 1 << 20, flags: 3))
        #expect(extents.dropFirst().first == .init(length: 1 << 20, flags: 0))
        #expect(extents.reduce(0) { $0 + UInt64($1.length) } == 8 << 20)
        let one = try client.blockStatus(count: 8 << 20, at: 0, flags: .requestOne)
        #expect(one.count == 1)
    }

    @Test func manyConnectionsAtOnce() async throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 16 << 20), scratch: scratch, extra: ["--threads", "2"])
        let uri = server.uri
        try await withThrowingTaskGroup(of: Void.self) { group in
            for c in 0..<8 {
                group.addTask {
                    let client = try NBDClient()
                    try client.connect(uri: uri)
                    let base = UInt64(c) << 21
                    for i in 0..<16 {
                        let offset = base + UInt64(i) * 65536
                        let data = Pattern().bytes(at: offset, count: 65536)
                        try client.write(data, at: offset)
                        guard try client.read(count: 65536, at: offset) == data else {
                            throw TestFailure("connection \(c) read back other data at \(offset)")
                        }
                    }
                    try client.shutdown()
                }
            }
            try await group.waitForAll()
        }
    }

    /// At least 1 GiB through the server (512 MiB written, 512 MiB read), with
    /// 16 requests in flight and every block checked.
    @Test func oneGibibyteThroughLibNBDWithDataChecked() throws {
        let chunk = 1 << 20, depth = 16, total = 512 << 20
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 256 << 20), scratch: scratch)
        let client = try NBDClient()
        try client.connect(uri: server.uri)
        let pattern = Pattern()
        let buffers = (0..<depth).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096) }
        defer { buffers.forEach { $0.deallocate() } }
        let imageSize = UInt64(256 << 20)

        func pump(writing: Bool) throws {
            var next = 0, done = 0
            var inFlight: [Int: (Int64, Int)] = [:]   // buffer -> (cookie, chunk index)
            while done < total / chunk {
                for b in 0..<depth where inFlight[b] == nil && next < total / chunk {
                    let offset = UInt64(next * chunk) % imageSize
                    if writing {
                        _ = pattern.bytes(at: offset, count: chunk).withUnsafeBytes { buffers[b].copyMemory(from: $0) }
                        inFlight[b] = (try client.startWrite(UnsafeRawBufferPointer(buffers[b]), at: offset), next)
                    } else {
                        inFlight[b] = (try client.startRead(buffers[b], at: offset), next)
                    }
                    next += 1
                }
                try client.poll(milliseconds: 1000)
                for (b, (cookie, index)) in inFlight where try client.isComplete(cookie) {
                    inFlight[b] = nil
                    done += 1
                    if !writing {
                        let offset = UInt64(index * chunk) % imageSize
                        let expected = pattern.bytes(at: offset, count: chunk)
                        guard expected.withUnsafeBytes({ memcmp($0.baseAddress!, buffers[b].baseAddress!, chunk) == 0 }) else {
                            throw TestFailure("data mismatch at offset \(offset)")
                        }
                    }
                }
            }
        }
        try pump(writing: true)
        try client.flush()
        try pump(writing: false)
        try client.shutdown()
        #expect(server.stop() == 0)
    }
}
