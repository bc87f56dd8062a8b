import Foundation
import LibNBD
import Testing

/// `keel replica serve`, started for real: the data plane an engine talks
/// to, and epoch fencing between engines.
@Suite(.serialized) struct ReplicaServeTests {
    private func replica(_ dir: String, _ scratch: Scratch, size: String? = "64M") throws -> KeelServer {
        try KeelServer(["replica", "serve", "--dir", dir] + (size.map { ["--size", $0] } ?? []), scratch: scratch)
    }

    private func engine(_ server: KeelServer, epoch: UInt64) throws -> NBDClient {
        let client = try NBDClient()
        try client.setExportName("vol@\(epoch)")
        try client.connect(unixSocket: server.socketPath!)
        return client
    }

    @Test func createsServesAndReopensAReplica() throws {
        let scratch = try Scratch()
        let dir = scratch.file("r1")
        var server = try replica(dir, scratch)
        var client = try engine(server, epoch: 1)
        #expect(try client.size == 64 << 20)
        let data = Pattern().bytes(at: 1 << 20, count: 1 << 20)
        try client.write(data, at: 1 << 20, flags: .fua)
        try client.shutdown()
        #expect(server.stop() == 0)

        server = try replica(dir, scratch, size: nil)
        client = try engine(server, epoch: 1)
        #expect(try client.read(count: 1 << 20, at: 1 << 20) == data)
        #expect(server.stop() == 0)
    }

    /// A second engine claims the replica: the first one's next write fails
    /// (ESHUTDOWN, before it reaches the disk), and it cannot come back.
    @Test func aNewerEpochFencesTheOlderEngine() throws {
        let scratch = try Scratch()
        let dir = scratch.file("r1")
        let server = try replica(dir, scratch)
        let old = try engine(server, epoch: 3)
        try old.write([UInt8](repeating: 1, count: 4096), at: 0)

        let new = try engine(server, epoch: 4)
        do {
            try old.write([UInt8](repeating: 2, count: 4096), at: 0)
            Issue.record("the fenced engine's write succeeded")
        } catch let error as NBDClientError {
            #expect(error.errno == ESHUTDOWN)
        }
        #expect(throws: NBDClientError.self) { _ = try old.read(count: 4096, at: 0) }
        #expect(try new.read(count: 4096, at: 0) == [UInt8](repeating: 1, count: 4096))
        #expect(throws: NBDClientError.self) { _ = try self.engine(server, epoch: 3) }
        #expect(server.stop() == 0)

        // The claim was persisted: after a restart epoch 3 stays fenced, 4 still works.
        let again = try replica(dir, scratch, size: nil)
        #expect(throws: NBDClientError.self) { _ = try self.engine(again, epoch: 3) }
        #expect(try engine(again, epoch: 4).read(count: 4096, at: 0) == [UInt8](repeating: 1, count: 4096))
        #expect(again.log.contains("epoch 4 claimed") == false)
    }

    /// Writes of the old engine in flight at the moment of the claim either
    /// land before the new engine's first request or not at all.
    @Test func inFlightWritesOfTheOldEpochNeverOvertakeTheNewEngine() throws {
        let scratch = try Scratch()
        let server = try replica(scratch.file("r1"), scratch)
        let old = try engine(server, epoch: 1)
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 4096)
        defer { block.deallocate() }
        block.initializeMemory(as: UInt8.self, repeating: 0xAA)
        var cookies: [Int64] = []
        for i in 0..<64 { cookies.append(try old.startWrite(UnsafeRawBufferPointer(block), at: UInt64(i) * 65536)) }
        let new = try engine(server, epoch: 2)
        let marker = [UInt8](repeating: 0x55, count: 65536)
        for i in 0..<64 { try new.write(marker, at: UInt64(i) * 65536) }
        // Let the old engine's requests finish, whatever their fate.
        let deadline = Date().addingTimeInterval(30)
        while old.commandsInFlight > 0 && Date() < deadline { try? old.poll(milliseconds: 100) }
        for cookie in cookies { _ = try? old.isComplete(cookie) }
        #expect(try new.read(count: 64 * 65536, at: 0) == [UInt8](repeating: 0x55, count: 64 * 65536))
    }

    @Test func refusesExportsWithoutAnEpoch() throws {
        let scratch = try Scratch()
        let server = try replica(scratch.file("r1"), scratch)
        let client = try NBDClient()
        #expect(throws: NBDClientError.self) { try client.connect(uri: server.uri) }
        let info = try run(["nbdinfo", server.uri(export: "vol@7")])
        #expect(info.status == 0 && info.stdout.contains("67108864"), "\(info.stderr)")
        // nbdinfo uses INFO then GO: only GO claims.
        #expect(server.log.contains("epoch 7 claimed"))
    }

    @Test func badCallsGetOneLine() throws {
        let scratch = try Scratch()
        let dir = scratch.file("r1")
        func expectFailure(_ arguments: [String], mentioning word: String) throws {
            let result = try run([Paths.keel] + arguments, timeout: 30)
            #expect(result.status != 0)
            #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
            #expect(result.stderr.contains(word), "\(result.stderr)")
        }
        try expectFailure(["replica", "serve", "--dir", dir, "--listen", "unix:\(scratch.file("a.sock"))"],
                          mentioning: "--size")
        try expectFailure(["replica", "serve", "--dir", dir, "--listen", "unix:\(scratch.file("a.sock"))", "--size", "12Q"],
                          mentioning: "--size")
        let server = try replica(dir, scratch)
        #expect(server.stop() == 0)
        try expectFailure(["replica", "serve", "--dir", dir, "--listen", "unix:\(scratch.file("a.sock"))", "--size", "1G"],
                          mentioning: "not 1073741824")
        let notReplica = scratch.file("photos")
        try FileManager.default.createDirectory(atPath: notReplica, withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: notReplica + "/cat.jpg", contents: Data([1]))
        try expectFailure(["replica", "serve", "--dir", notReplica, "--listen", "unix:\(scratch.file("b.sock"))", "--size", "1G"],
                          mentioning: "no Keel replica")
    }
}
