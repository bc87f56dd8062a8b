import Foundation
import Testing

/// `keel export` as a command: bad calls get one clear line and a non-zero exit.
@Suite(.serialized) struct CLITests {
    private func expectOneLineFailure(_ arguments: [String], mentioning words: [String]) throws {
        let result = try run([Paths.keel] + arguments, timeout: 30)
        #expect(result.status != 0)
        let lines = result.stderr.split(separator: "\n")
        #expect(lines.count == 1, "stderr: \(result.stderr)")
        for word in words { #expect(result.stderr.contains(word), "stderr: \(result.stderr)") }
    }

    @Test func missingFile() throws {
        try expectOneLineFailure(["export", "/nonexistent/disk.img", "--listen", "unix:/tmp/x.sock"],
                                 mentioning: ["/nonexistent/disk.img", "No such file"])
    }

    @Test func badAddresses() throws {
        let scratch = try Scratch()
        let image = try scratch.image(size: 1 << 20)
        try expectOneLineFailure(["export", image, "--listen", "nowhere"], mentioning: ["--listen", "HOST:PORT"])
        try expectOneLineFailure(["export", image, "--listen", "127.0.0.1:99999"], mentioning: ["port"])
        try expectOneLineFailure(["export", image, "--listen", "unix:"], mentioning: ["unix:/path"])
        try expectOneLineFailure(["export", image, "--listen", "999.1.1.1:10809"], mentioning: ["999.1.1.1"])
    }

    @Test func takenPortAndTakenSocket() throws {
        let scratch = try Scratch()
        let image = try scratch.image(size: 1 << 20)
        let (first, port) = try onFreeTCPPort { try KeelServer(image: image, scratch: scratch, address: "127.0.0.1:\($0)") }
        try expectOneLineFailure(["export", image, "--listen", "127.0.0.1:\(port)"], mentioning: ["already in use"])
        let onSocket = try KeelServer(image: image, scratch: scratch)
        try expectOneLineFailure(["export", image, "--listen", onSocket.address], mentioning: ["another process"])
        #expect(first.stop() == 0)
        #expect(onSocket.stop() == 0)
    }

    @Test func usageErrors() throws {
        try expectOneLineFailure(["export"], mentioning: ["file"])
        try expectOneLineFailure(["export", "x.img"], mentioning: ["--listen"])
        try expectOneLineFailure(["export", "x.img", "--listen", "unix:/tmp/s", "--threads", "0"], mentioning: ["--threads"])
        try expectOneLineFailure(["frobnicate"], mentioning: ["frobnicate"])
    }

    @Test func sigintAndSigtermExitCleanlyAndRemoveTheSocket() throws {
        let scratch = try Scratch()
        let image = try scratch.image(size: 1 << 20)
        for signal in [SIGINT, SIGTERM] {
            let server = try KeelServer(image: image, scratch: scratch)
            kill(server.process.processIdentifier, signal)
            server.process.waitUntilExit()
            #expect(server.process.terminationStatus == 0)
            #expect(!FileManager.default.fileExists(atPath: server.socketPath!))
        }
    }

    /// SIGTERM under load: requests in flight finish, the process exits 0 promptly.
    @Test func sigtermDuringIOExitsCleanly() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 64 << 20), scratch: scratch)
        let fio = Process()
        fio.executableURL = URL(fileURLWithPath: "/usr/bin/fio")
        fio.arguments = ["--name=load", "--ioengine=nbd", "--uri=\(server.uri)", "--rw=randrw", "--bs=64k",
                         "--iodepth=32", "--size=64M", "--time_based", "--runtime=30"]
        fio.standardOutput = FileHandle.nullDevice
        fio.standardError = FileHandle.nullDevice
        try fio.run()
        defer { if fio.isRunning { fio.terminate() } }
        usleep(1_000_000)
        let started = Date()
        #expect(server.stop() == 0)
        #expect(Date().timeIntervalSince(started) < 10)
    }

    @Test func helpExitsZero() throws {
        let result = try run([Paths.keel, "export", "--help"])
        #expect(result.status == 0)
        #expect(result.stdout.contains("--listen"))
    }
}
