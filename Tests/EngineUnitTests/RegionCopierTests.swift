@testable import Engine
import Foundation
import LibNBD
import Testing

/// A rebuild's copy against real NBD servers (nbdkit's memory plugin): one read of the source
/// feeds every target with their writes in flight together, and a target that stops answering
/// is the one blamed, within its deadline, with the others' writes finished.
@Suite struct RegionCopierTests {
    private static let size = 4 << 20

    /// `nbdkit memory` on a unix socket in `directory`; killed by `stop`.
    private final class MemoryServer {
        let process = Process()
        let socket: String

        init(_ directory: URL, name: String) throws {
            socket = directory.appendingPathComponent("\(name).sock").path
            process.executableURL = URL(fileURLWithPath: "/usr/bin/nbdkit")
            process.arguments = ["-f", "--exit-with-parent", "-U", socket, "memory", "\(RegionCopierTests.size)"]
            try process.run()
            for _ in 0..<200 where !FileManager.default.fileExists(atPath: socket) { usleep(50_000) }
        }

        func client() throws -> NBDClient {
            try RegionCopier.connect { try $0.connect(unixSocket: self.socket) }
        }

        func stop() {
            kill(process.processIdentifier, SIGCONT)
            kill(process.processIdentifier, SIGKILL)  // on SIGTERM nbdkit waits for its connections
            process.waitUntilExit()
        }
    }

    private func withServers(_ body: (MemoryServer, [MemoryServer]) throws -> Void) throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("keel-copier-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let source = try MemoryServer(directory, name: "source")
        defer { source.stop() }
        var targets: [MemoryServer] = []
        defer { targets.forEach { $0.stop() } }
        for index in 0..<3 { targets.append(try MemoryServer(directory, name: "target\(index)")) }
        try body(source, targets)
    }

    /// Three data extents and the holes between them.
    private func fill(_ source: NBDClient) throws -> [UInt8] {
        var image = [UInt8](repeating: 0, count: Self.size)
        for (offset, length) in [(0, 1 << 20), (3 << 19, 3 << 19), (7 << 19, 1 << 19)] {
            for i in offset..<(offset + length) { image[i] = UInt8(truncatingIfNeeded: i &* 2_654_435_761 >> 13) | 1 }
            try source.write(Array(image[offset..<(offset + length)]), at: UInt64(offset))
        }
        return image
    }

    @Test func everyTargetGetsTheSourcesBytes() throws {
        try withServers { source, targets in
            let image = try fill(try source.client())
            let targetClients = try targets.map { try $0.client() }
            let copier = RegionCopier(source: try source.client(), targets: targetClients, timeoutSeconds: 30)
            let data = try copier.copy(offset: 0, length: UInt64(Self.size))
            #expect(data == UInt64(3 << 20))  // the data extents, not the holes
            for (index, client) in targetClients.enumerated() {
                #expect(try client.read(count: Self.size, at: 0) == image, "target \(index)")
            }
        }
    }

    @Test func aFrozenTargetIsBlamedWithinItsDeadlineAndTheOthersFinish() throws {
        try withServers { source, targets in
            let image = try fill(try source.client())
            let targetClients = try targets.map { try $0.client() }
            kill(targets[1].process.processIdentifier, SIGSTOP)
            let copier = RegionCopier(source: try source.client(), targets: targetClients, timeoutSeconds: 2)
            let started = Date()
            #expect {
                try copier.copy(offset: 0, length: UInt64(Self.size))
            } throws: { error in
                guard let failure = error as? RegionCopier.TargetFailure else { return false }
                return failure.target == 1 && "\(failure)".contains("no answer within 2.0 s")
            }
            #expect(Date().timeIntervalSince(started) < 20)
            for index in [0, 2] {
                #expect(try targetClients[index].read(count: 1 << 20, at: 0) == Array(image[0..<(1 << 20)]), "target \(index)")
            }
        }
    }
}
