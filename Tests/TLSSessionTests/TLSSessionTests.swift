import ClusterCA
import Foundation
import Testing
@testable import TLSSession

/// Server and client sessions wired to each other in memory: the handshake,
/// records both ways, and each way a peer is refused, with no socket.
@Suite struct TLSSessionTests {
    let directory: String

    init() throws {
        directory = NSTemporaryDirectory() + "keel-tls-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    /// A CA and one node's files in `directory/name` (ca-cert.pem, server-*.pem, client-*.pem).
    func node(_ name: String, ca: String = "ca", issued: Date = Date()) throws -> String {
        let caDirectory = "\(directory)/\(ca)"
        let authority = FileManager.default.fileExists(atPath: caDirectory + "/" + ClusterCA.keyFile)
            ? try ClusterCA.load(from: caDirectory) : try ClusterCA.create(in: caDirectory)
        let credentials = try authority.issue(commonName: name, dnsNames: [name], ipAddresses: [], days: 1, now: issued)
        try credentials.write(to: "\(directory)/\(name)")
        return "\(directory)/\(name)"
    }

    func pskFile(_ lines: String) throws -> String {
        let path = "\(directory)/keys-\(UUID().uuidString).psk"
        try lines.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    /// Runs both handshakes to their end, moving bytes between them.
    func connect(_ server: TLSSession, _ client: TLSSession) -> (server: TLSSession.HandshakeStatus, client: TLSSession.HandshakeStatus) {
        var serverStatus = TLSSession.HandshakeStatus.inProgress, clientStatus = serverStatus
        for _ in 0..<20 {
            clientStatus = client.handshake()
            pass(client, to: server)
            serverStatus = server.handshake()
            pass(server, to: client)
            if serverStatus != .inProgress && clientStatus != .inProgress { break }
            if case .failed = serverStatus { clientStatus = client.handshake(); break }
            if case .failed = clientStatus { serverStatus = server.handshake(); break }
        }
        return (serverStatus, clientStatus)
    }

    func pass(_ from: TLSSession, to: TLSSession) {
        var bytes: [UInt8] = []
        from.takeOutgoing(into: &bytes)
        bytes.withUnsafeBytes { to.feed($0) }
    }

    func receiveAll(_ session: TLSSession, count: Int) -> [UInt8] {
        var received: [UInt8] = []
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 8)
        defer { buffer.deallocate() }
        for _ in 0..<1000 where received.count < count {
            guard case .bytes(let n) = session.receive(into: buffer) else { break }
            received += buffer[0..<n]
        }
        return received
    }

    @Test func certificatesBothWaysCarryRecords() throws {
        let server = try TLSSession(credentials: .certificates(directory: node("server"), role: .server))
        let client = try TLSSession(credentials: .certificates(directory: node("client"), role: .client))
        let status = connect(server, client)
        #expect(status.server == .established && status.client == .established)
        #expect(server.summary.hasPrefix("TLS1.3"))

        let payload = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        server.cork()
        #expect(payload.withUnsafeBytes { server.send($0) })
        #expect(server.uncork())
        pass(server, to: client)
        #expect(receiveAll(client, count: payload.count) == payload)

        #expect(([1, 2, 3] as [UInt8]).withUnsafeBytes { client.send($0) })
        pass(client, to: server)
        #expect(receiveAll(server, count: 3) == [1, 2, 3])

        client.closeNotify()
        pass(client, to: server)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        defer { buffer.deallocate() }
        #expect(server.receive(into: buffer) == .closed)
    }

    @Test func aClientWithoutACertificateIsRefusedWhenPeersAreVerified() throws {
        let server = try TLSSession(credentials: .certificates(directory: node("server"), role: .server))
        let bare = "\(directory)/bare"
        try FileManager.default.createDirectory(atPath: bare, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: "\(directory)/server/ca-cert.pem", toPath: "\(bare)/ca-cert.pem")
        let client = try TLSSession(credentials: .certificates(directory: bare, role: .client))
        let status = connect(server, client)
        guard case .failed = status.server else { Issue.record("server accepted \(status)"); return }
        // In TLS 1.3 the client finishes first; the server's alert ends it on its next read.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        defer { buffer.deallocate() }
        if status.client == .established, case .bytes = client.receive(into: buffer) { Issue.record("client read data") }
    }

    @Test func withoutPeerVerificationAClientNeedsNoCertificate() throws {
        let server = try TLSSession(credentials: .certificates(directory: node("server"), role: .server, verifyPeer: false))
        let bare = "\(directory)/bare"
        try FileManager.default.createDirectory(atPath: bare, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: "\(directory)/server/ca-cert.pem", toPath: "\(bare)/ca-cert.pem")
        let client = try TLSSession(credentials: .certificates(directory: bare, role: .client))
        let status = connect(server, client)
        #expect(status.server == .established && status.client == .established)
    }

    @Test func aClientFromAnotherCAIsRefused() throws {
        let server = try TLSSession(credentials: .certificates(directory: node("server"), role: .server))
        let rogue = try node("rogue", ca: "other-ca")
        // The rogue trusts the real CA, so only the server's check can stop it.
        try FileManager.default.removeItem(atPath: "\(rogue)/ca-cert.pem")
        try FileManager.default.copyItem(atPath: "\(directory)/server/ca-cert.pem", toPath: "\(rogue)/ca-cert.pem")
        let client = try TLSSession(credentials: .certificates(directory: rogue, role: .client))
        let status = connect(server, client)
        guard case .failed(let reason) = status.server else { Issue.record("server accepted \(status)"); return }
        #expect(reason.contains("issuer is unknown"), "\(reason)")
    }

    @Test func anExpiredClientCertificateIsRefused() throws {
        let server = try TLSSession(credentials: .certificates(directory: node("server"), role: .server))
        let expired = try node("expired", issued: Date(timeIntervalSinceNow: -10 * 86400))
        let client = try TLSSession(credentials: .certificates(directory: expired, role: .client))
        let status = connect(server, client)
        guard case .failed(let reason) = status.server else { Issue.record("server accepted \(status)"); return }
        #expect(reason.contains("expired"), "\(reason)")
    }

    @Test func preSharedKeysNameTheirIdentity() throws {
        let keys = try pskFile("bob:00112233445566778899aabbccddeeff\nalice:8ea2e82a0d1b5c6f4a7e3bd01f3c2a98\n")
        let server = try TLSSession(credentials: .serverKeys(file: keys))
        let client = try TLSSession(credentials: .clientKey(file: keys, identity: "alice"))
        let status = connect(server, client)
        #expect(status.server == .established && status.client == .established)
        #expect(server.summary.contains("PSK identity alice"), "\(server.summary)")
    }

    @Test func aWrongPreSharedKeyIsRefused() throws {
        let server = try TLSSession(credentials: .serverKeys(file: pskFile("alice:8ea2e82a0d1b5c6f4a7e3bd01f3c2a98\n")))
        let client = try TLSSession(credentials: .clientKey(file: pskFile("alice:000102030405060708090a0b0c0d0e0f\n"), identity: "alice"))
        let status = connect(server, client)
        guard case .failed = status.server else { Issue.record("server accepted \(status)"); return }
    }

    @Test func missingFilesAreNamed() throws {
        #expect(throws: TLSError.self) { try TLSCredentials.certificates(directory: "\(directory)/nowhere", role: .server) }
        do {
            _ = try TLSCredentials.serverKeys(file: "\(directory)/none.psk")
            Issue.record("a missing PSK file was accepted")
        } catch {
            #expect("\(error)".contains("none.psk"))
        }
    }

    @Test func pskFileParsing() {
        #expect(PSKFile.bytes(hex: "00ff10") == [0, 255, 16])
        #expect(PSKFile.bytes(hex: "0g") == nil)
        #expect(PSKFile.bytes(hex: "abc") == nil)
    }
}
