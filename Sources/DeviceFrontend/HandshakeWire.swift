import Syscalls
import TLSSession
#if canImport(Glibc)
import Glibc
#endif

/// The socket a link's handshake runs on: plaintext, or, after STARTTLS,
/// inside a TLS session that the kernel takes over once the export is agreed.
final class HandshakeWire {
    let fd: FileDescriptor
    let endpoint: EngineEndpoint
    let deadline: EngineLink.Deadline
    private(set) var session: TLSSession?
    private var buffer = [UInt8](repeating: 0, count: 16 * 1024)

    init(fd: FileDescriptor, endpoint: EngineEndpoint, deadline: EngineLink.Deadline) {
        self.fd = fd
        self.endpoint = endpoint
        self.deadline = deadline
    }

    /// Whether bytes arrived that nobody has read yet (inside TLS: fed, not decrypted).
    var hasPendingInput: Bool { session?.hasBufferedInput ?? false }

    /// The next plaintext bytes from the engine.
    func receive() throws -> [UInt8] {
        guard let session else { return try receiveFromSocket() }
        var plain = [UInt8](repeating: 0, count: buffer.count)
        while true {
            let result = plain.withUnsafeMutableBytes { session.receive(into: $0) }
            switch result {
            case .bytes(let count): return Array(plain[..<count])
            case .needMore: session.feedBytes(try receiveFromSocket())
            case .closed: throw SystemError(errno: ECONNRESET, "engine \(endpoint) ended TLS during the handshake")
            case .failed(let reason): throw SystemError(errno: EPROTO, "engine \(endpoint): TLS: \(reason)")
            }
        }
    }

    /// Plaintext to the engine (encrypted inside TLS).
    func send(_ bytes: [UInt8]) throws {
        guard !bytes.isEmpty else { return }
        guard let session else { return try sendToSocket(bytes) }
        guard bytes.withUnsafeBytes({ session.send($0) }) else {
            throw SystemError(errno: EPROTO, "engine \(endpoint): TLS refused to send")
        }
        try flush(session)
    }

    /// The TLS handshake, as the client, after the engine agreed to STARTTLS.
    func startTLS(_ credentials: TLSCredentials) throws {
        let session: TLSSession
        do { session = try TLSSession(credentials: credentials) } catch {
            throw SystemError(errno: EPROTO, "engine \(endpoint): TLS: \(error)")
        }
        while true {
            let status = session.handshake()
            try flush(session)
            switch status {
            case .established:
                self.session = session
                return
            case .failed(let reason):
                throw SystemError(errno: EPROTO, "engine \(endpoint): TLS handshake: \(reason)")
            case .inProgress:
                session.feedBytes(try receiveFromSocket())
            }
        }
    }

    /// Inside TLS, the session's keys go to the kernel (kTLS): a socket the
    /// NBD driver can use. Nothing may be half sent or half read.
    func handRecordsToKernel() throws {
        guard let session else { return }
        switch session.handOverToKernel(socket: fd.rawValue) {
        case .done: return
        case .kernelLacksTLS:
            throw SystemError(errno: EOPNOTSUPP, "engine \(endpoint): this kernel has no kTLS (modprobe tls): the device's links cannot carry TLS")
        case .unavailable(let reason), .broken(let reason):
            throw SystemError(errno: EPROTO, "engine \(endpoint): the kernel cannot take the TLS session: \(reason)")
        }
    }

    private func flush(_ session: TLSSession) throws {
        var records: [UInt8] = []
        session.takeOutgoing(into: &records)
        try sendToSocket(records)
    }

    private func receiveFromSocket() throws -> [UInt8] {
        try EngineLink.wait(fd, for: POLLIN, before: deadline, "engine \(endpoint): no handshake answer in time")
        let count = buffer.withUnsafeMutableBytes { recv(fd.rawValue, $0.baseAddress, $0.count, 0) }
        if count > 0 { return Array(buffer[..<count]) }
        throw SystemError(errno: count == 0 ? ECONNRESET : errno, "engine \(endpoint) closed the connection during the handshake")
    }

    private func sendToSocket(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            try EngineLink.wait(fd, for: POLLOUT, before: deadline, "engine \(endpoint): cannot send the handshake in time")
            let sent = bytes.withUnsafeBytes { Glibc.send(fd.rawValue, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            guard sent > 0 else {
                if errno == EINTR || errno == EAGAIN { continue }
                throw SystemError.current("engine \(endpoint): send")
            }
            offset += sent
        }
    }
}

private extension TLSSession {
    func feedBytes(_ bytes: [UInt8]) { bytes.withUnsafeBytes { feed($0) } }
}
