import Foundation
import Syscalls
import Testing

/// The units in Systemd/ and the readiness protocol they rely on (Type=notify).
@Suite struct SystemdTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../..").standardized.path

    /// `systemd-analyze verify` finds nothing to say (the binary path points
    /// at the build, as `keel` is not installed on the test machine).
    @Test func unitsPassSystemdAnalyzeVerify() throws {
        let scratch = try Scratch()
        let units = ["keel-replica@.service", "keel-engine@.service", "keel-frontend@.service", "keel-node.service",
                     "keel-replicas.target"]
        for unit in units {
            let text = try String(contentsOfFile: Self.repository + "/Systemd/" + unit, encoding: .utf8)
            try text.replacingOccurrences(of: "/usr/local/bin/keel", with: Paths.keel)
                .write(toFile: scratch.file(unit), atomically: true, encoding: .utf8)
        }
        let result = try run(["systemd-analyze", "verify", "--man=no", "--generators=no",
                              scratch.file("keel-replica@r1.service"), scratch.file("keel-engine@vol.service"),
                              scratch.file("keel-frontend@vol.service"), scratch.file("keel-node.service"),
                              scratch.file("keel-replicas.target")], timeout: 60)
        #expect(result.status == 0, "\(result.stderr)")
        #expect((result.stdout + result.stderr).isEmpty, "\(result.stdout)\(result.stderr)")
    }

    /// A daemon started by systemd says READY=1 once it serves, STOPPING=1 on SIGTERM.
    @Test func daemonsNotifyReadinessAndStopping() throws {
        let scratch = try Scratch()
        let socketPath = scratch.file("notify.sock")
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        #expect(fd >= 0)
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { sun in
            for (i, byte) in socketPath.utf8.enumerated() { sun[i] = byte }
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(bound == 0)
        var timeout = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        func receive() -> String {
            var buffer = [UInt8](repeating: 0, count: 4096)
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            return count > 0 ? String(decoding: buffer.prefix(count), as: UTF8.self) : ""
        }
        let server = try KeelServer(image: try scratch.image(size: 1 << 20), scratch: scratch,
                                    environment: ["NOTIFY_SOCKET": socketPath])
        #expect(receive().hasPrefix("READY=1\nSTATUS=serving"))
        server.stop()
        #expect(receive() == "STOPPING=1")
    }
}
