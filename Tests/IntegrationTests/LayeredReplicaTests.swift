import Foundation
import LibNBD
import SeededRandom
import Testing

/// `keel replica serve` on its chain of layers (one, the head, until
/// snapshots): writes, trims and zeroes at any alignment against a byte
/// model, through a restart and a kill -9 (the map log replayed), and
/// BLOCK_STATUS from the map.
@Suite(.serialized) struct LayeredReplicaTests {
    private func replica(_ dir: String, _ scratch: Scratch, size: String? = "8M") throws -> KeelServer {
        try KeelServer(["replica", "serve", "--dir", dir] + (size.map { ["--size", $0] } ?? []), scratch: scratch)
    }

    private func engine(_ server: KeelServer) throws -> NBDClient {
        let client = try NBDClient()
        try client.addMetaContext("base:allocation")
        try client.setExportName("vol@1")
        try client.connect(unixSocket: server.socketPath!)
        return client
    }

    @Test(arguments: [1, 2] as [UInt64])
    func writesTrimsAndZeroesMatchAModelThroughRestartAndKill(seed: UInt64) throws {
        print("layered replica model test: seed \(seed)")
        let size = 8 << 20
        let scratch = try Scratch()
        let dir = scratch.file("r1")
        var server = try replica(dir, scratch)
        var client = try engine(server)
        var model = [UInt8](repeating: 0, count: size)
        var random = SplitMix64(seed: seed)
        for i in 0..<400 {
            let length = 1 + random.below(random.below(4) == 0 ? 300_000 : 20_000)
            let offset = random.below(size - length)
            switch random.below(10) {
            case 0..<6:
                let data = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) | 1 }
                try client.write(data, at: UInt64(offset), flags: i % 9 == 0 ? .fua : [])
                model.replaceSubrange(offset..<offset + length, with: data)
            case 6..<8:
                try client.zero(count: UInt64(length), at: UInt64(offset), flags: i % 2 == 0 ? .noHole : [])
                model.replaceSubrange(offset..<offset + length, with: repeatElement(0, count: length))
            default:
                // TRIM: whole blocks inside read as zeroes after it (the replica records them); the partial ends are untouched.
                try client.trim(count: UInt64(length), at: UInt64(offset))
                let start = (offset + 4095) / 4096 * 4096, end = (offset + length) / 4096 * 4096
                if start < end { model.replaceSubrange(start..<end, with: repeatElement(0, count: end - start)) }
            }
            let probe = random.below(size - 9000)
            let read = try client.read(count: 9000, at: UInt64(probe))
            if read != Array(model[probe..<probe + 9000]) {
                Issue.record("seed \(seed), step \(i): read at \(probe) differs from the model")
                return
            }
        }
        #expect(try client.read(count: size, at: 0) == model, "seed \(seed)")
        let extents = try client.blockStatus(count: UInt64(size), at: 0)
        #expect(extents.reduce(0) { $0 + UInt64($1.length) } == UInt64(size))
        var at = 0
        for extent in extents {
            if extent.flags & 1 != 0 {
                #expect(model[at..<at + Int(extent.length)].allSatisfy { $0 == 0 }, "a hole holds data at \(at)")
            }
            at += Int(extent.length)
        }
        try client.shutdown()
        #expect(server.stop() == 0)

        // Reopened: the map log replays to the same volume.
        server = try replica(dir, scratch, size: nil)
        client = try engine(server)
        #expect(try client.read(count: size, at: 0) == model, "seed \(seed): after a restart")
        // Acknowledged without a FLUSH, then kill -9: the process dies, the page cache keeps both files.
        try client.write([UInt8](repeating: 0xEE, count: 5000), at: 100_000)
        model.replaceSubrange(100_000..<105_000, with: repeatElement(0xEE, count: 5000))
        try client.zero(count: 3 << 20, at: 2 << 20)
        model.replaceSubrange((2 << 20)..<(5 << 20), with: repeatElement(0, count: 3 << 20))
        kill(server.process.processIdentifier, SIGKILL)
        server.process.waitUntilExit()
        server = try replica(dir, scratch, size: nil)
        client = try engine(server)
        #expect(try client.read(count: size, at: 0) == model, "seed \(seed): after kill -9")
        #expect(server.stop() == 0)
    }
}
