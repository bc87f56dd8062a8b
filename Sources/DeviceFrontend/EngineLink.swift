import NBDProtocol
import Syscalls
import TLSSession
#if canImport(Glibc)
import Glibc
#endif

/// Where a device's connections go: an engine's NBD address and the export (the volume).
public struct EngineEndpoint: Sendable, Equatable, CustomStringConvertible {
    public var address: SocketAddress
    public var exportName: String

    public init(address: SocketAddress, exportName: String) {
        self.address = address
        self.exportName = exportName
    }

    public var description: String { "\(address)" }
}

/// One connection to an engine in the transmission phase: the handshake is
/// done, the socket is ready for the kernel.
public struct EngineLink {
    public let fd: FileDescriptor
    public let size: UInt64
    public let flags: TransmissionFlags
    /// TLS, its records held by the kernel (kTLS).
    public let encrypted: Bool

    /// Connects and negotiates within `timeout` milliseconds in all; an engine
    /// whose node is cut off fails here, not after the system's SYN retries.
    /// Over TCP, an engine's node that leaves data or keepalive probes
    /// unanswered for `unanswered` milliseconds ends the connection: a node
    /// that is cut off is noticed then, before the kernel's I/O timeout (the
    /// requests in flight were acknowledged by TCP, and the kernel sends
    /// nothing more while it waits for their replies: only probes notice).
    /// With `tls`, the link starts TLS (STARTTLS), negotiates the export
    /// inside it, and hands the session's records to the kernel (kTLS): the
    /// NBD driver then reads and writes plaintext on an encrypted link.
    public static func open(_ endpoint: EngineEndpoint, timeout: Int32, unanswered: UInt32? = nil,
                            tls: TLSCredentials? = nil) throws -> EngineLink {
        let deadline = Deadline(milliseconds: timeout)
        let fd = try Socket.connect(to: endpoint.address, timeout: timeout)
        do {
            if case .tcp = endpoint.address {
                Socket.setNoDelay(fd)
                if let unanswered { setDeadPeerTimeout(fd, milliseconds: unanswered) }
            }
            let wire = HandshakeWire(fd: fd, endpoint: endpoint, deadline: deadline)
            var handshake = ClientHandshake(exportName: endpoint.exportName, startTLS: tls != nil)
            while true {
                let received = try wire.receive()
                var send: [UInt8] = []
                let step = received.withUnsafeBytes { handshake.receive($0, send: &send) }
                try wire.send(send)
                switch step {
                case .needMore: continue
                case .finished(let size, let flags, let consumed):
                    guard consumed == received.count, !wire.hasPendingInput else {
                        throw SystemError(errno: EPROTO, "engine \(endpoint): data after the handshake")
                    }
                    try wire.handRecordsToKernel()
                    return EngineLink(fd: fd, size: size, flags: flags, encrypted: wire.session != nil)
                case .startTLS(let consumed):
                    guard let tls, consumed == received.count, wire.session == nil else {
                        throw SystemError(errno: EPROTO, "engine \(endpoint): TLS was not asked for")
                    }
                    try wire.startTLS(tls)
                    var inside: [UInt8] = []
                    handshake.resumeInsideTLS(send: &inside)
                    try wire.send(inside)
                case .failed(let reason):
                    throw SystemError(errno: EPROTO, "engine \(endpoint): \(reason)")
                }
            }
        } catch {
            fd.close()
            throw error
        }
    }

    /// Keepalive probes every second after a second of silence, and the user
    /// timeout that then decides when an unanswered peer is dead.
    private static func setDeadPeerTimeout(_ fd: FileDescriptor, milliseconds: UInt32) {
        func set(_ level: Int32, _ option: Int32, _ value: Int32) {
            var value = value
            setsockopt(fd.rawValue, level, option, &value, socklen_t(MemoryLayout<Int32>.size))
        }
        set(SOL_SOCKET, SO_KEEPALIVE, 1)
        set(Int32(IPPROTO_TCP), TCP_KEEPIDLE, 1)
        set(Int32(IPPROTO_TCP), TCP_KEEPINTVL, 1)
        set(Int32(IPPROTO_TCP), TCP_KEEPCNT, Int32(max(1, milliseconds / 1000)))
        set(Int32(IPPROTO_TCP), TCP_USER_TIMEOUT, Int32(clamping: milliseconds))
    }

    struct Deadline {
        let end: UInt64
        init(milliseconds: Int32) { end = monotonicNanoseconds() + UInt64(max(0, milliseconds)) * 1_000_000 }
        var remainingMilliseconds: Int32 {
            let now = monotonicNanoseconds()
            return now >= end ? 0 : Int32(clamping: (end - now) / 1_000_000)
        }
    }

    static func wait(_ fd: FileDescriptor, for events: Int32, before deadline: Deadline,
                             _ what: String) throws {
        var entry = pollfd(fd: fd.rawValue, events: Int16(events), revents: 0)
        while true {
            let ready = poll(&entry, 1, deadline.remainingMilliseconds)
            if ready > 0 { return }
            if ready < 0 && errno == EINTR { continue }
            throw SystemError(errno: ready == 0 ? ETIMEDOUT : errno, what)
        }
    }
}
