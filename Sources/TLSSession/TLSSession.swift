import CGnuTLS
#if canImport(Glibc)
import Glibc
#endif

/// One TLS session over memory: the owner feeds it the bytes that arrived
/// and sends what it left in `outgoing`. GnuTLS never touches a socket, so
/// no call here blocks and the session lives on whatever thread owns the
/// connection (an io_uring I/O thread: no thread per connection).
public final class TLSSession {
    public enum HandshakeStatus: Equatable {
        case inProgress
        case established
        case failed(String)
    }

    public enum Received: Equatable {
        case bytes(Int)
        case needMore
        /// The peer sent close_notify.
        case closed
        case failed(String)
    }

    let session: OpaquePointer
    private let credentials: TLSCredentials
    private var incoming: [UInt8] = []
    private var incomingHead = 0
    /// Records to send, in order; the owner takes them (`takeOutgoing`).
    public private(set) var outgoing: [UInt8] = []
    public private(set) var isEstablished = false

    public init(credentials: TLSCredentials) throws {
        var session: OpaquePointer?
        let flags = UInt32(credentials.role == .server ? GNUTLS_SERVER : GNUTLS_CLIENT) | UInt32(GNUTLS_NONBLOCK)
        var result = gnutls_init(&session, flags)
        guard result == GNUTLS_E_SUCCESS, let session else { throw TLSError(result, "TLS session") }
        self.session = session
        self.credentials = credentials
        result = credentials.apply(to: session)
        guard result == GNUTLS_E_SUCCESS else {
            gnutls_deinit(session)
            throw TLSError(result, "TLS session credentials")
        }
        gnutls_transport_set_ptr(session, Unmanaged.passUnretained(self).toOpaque())
        gnutls_transport_set_push_function(session) { context, data, count in
            let this = Unmanaged<TLSSession>.fromOpaque(context!).takeUnretainedValue()
            this.outgoing.append(contentsOf: UnsafeRawBufferPointer(start: data, count: count))
            return count
        }
        gnutls_transport_set_pull_function(session) { context, data, count in
            let this = Unmanaged<TLSSession>.fromOpaque(context!).takeUnretainedValue()
            return this.pull(into: data!, count: count)
        }
        gnutls_transport_set_pull_timeout_function(session) { context, _ in
            let this = Unmanaged<TLSSession>.fromOpaque(context!).takeUnretainedValue()
            return this.incomingHead < this.incoming.count ? 1 : 0
        }
    }

    deinit { gnutls_deinit(session) }

    private func pull(into data: UnsafeMutableRawPointer, count: Int) -> Int {
        let available = incoming.count - incomingHead
        guard available > 0 else {
            gnutls_transport_set_errno(session, EAGAIN)
            return -1
        }
        let take = min(available, count)
        incoming.withUnsafeBytes { data.copyMemory(from: $0.baseAddress! + incomingHead, byteCount: take) }
        incomingHead += take
        if incomingHead == incoming.count {
            incoming.removeAll(keepingCapacity: true)
            incomingHead = 0
        }
        return take
    }

    /// Bytes that arrived from the peer.
    public func feed(_ bytes: UnsafeRawBufferPointer) {
        if incomingHead > 0 && incomingHead >= incoming.count / 2 {
            incoming.removeFirst(incomingHead)
            incomingHead = 0
        }
        incoming.append(contentsOf: bytes)
    }

    /// Whether bytes are fed and not yet decrypted.
    public var hasBufferedInput: Bool { incomingHead < incoming.count }

    /// Moves the records to send into `output` (after what it holds).
    public func takeOutgoing(into output: inout [UInt8]) {
        guard !outgoing.isEmpty else { return }
        if output.isEmpty { swap(&output, &outgoing) } else {
            output.append(contentsOf: outgoing)
            outgoing.removeAll(keepingCapacity: true)
        }
    }

    /// Advances the handshake with the bytes fed so far. A failure leaves
    /// the alert that tells the peer why in `outgoing`.
    public func handshake() -> HandshakeStatus {
        if isEstablished { return .established }
        let result = gnutls_handshake(session)
        if result == GNUTLS_E_SUCCESS {
            isEstablished = true
            return .established
        }
        if gnutls_error_is_fatal(result) == 0 { return .inProgress }
        let reason = failureReason(result)
        gnutls_alert_send_appropriate(session, result)
        return .failed(reason)
    }

    private func failureReason(_ result: Int32) -> String {
        var reason = String(cString: gnutls_strerror(result))
        if result == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR {
            var printed = gnutls_datum_t()
            let status = gnutls_session_get_verify_cert_status(session)
            if gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &printed, 0) == GNUTLS_E_SUCCESS {
                reason += ": " + String(cString: printed.data)
                gnutls_free(printed.data)
            }
        }
        return reason
    }

    /// Decrypts the next record's bytes into `buffer`.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) -> Received {
        precondition(isEstablished, "application data before the TLS handshake finished")
        let result = gnutls_record_recv(session, buffer.baseAddress, buffer.count)
        if result > 0 { return .bytes(result) }
        if result == 0 { return .closed }
        let code = Int32(result)
        if code == GNUTLS_E_AGAIN || code == GNUTLS_E_INTERRUPTED { return .needMore }
        // A rekey or a TLS 1.3 post-handshake message: handled, no data yet.
        if gnutls_error_is_fatal(code) == 0 { return hasBufferedInput ? receive(into: buffer) : .needMore }
        return .failed(String(cString: gnutls_strerror(code)))
    }

    /// Encrypts `bytes` into `outgoing`. Between `cork` and `uncork`, small
    /// pieces (a reply's header and its data) share records.
    public func send(_ bytes: UnsafeRawBufferPointer) -> Bool {
        precondition(isEstablished, "application data before the TLS handshake finished")
        var offset = 0
        while offset < bytes.count {
            let result = gnutls_record_send(session, bytes.baseAddress! + offset, bytes.count - offset)
            guard result > 0 else { return false }
            offset += result
        }
        return true
    }

    public func cork() { gnutls_record_cork(session) }

    public func uncork() -> Bool {
        gnutls_record_uncork(session, UInt32(GNUTLS_RECORD_WAIT)) >= 0
    }

    /// close_notify into `outgoing`: the peer sees a clean end.
    public func closeNotify() {
        guard isEstablished else { return }
        _ = gnutls_bye(session, GNUTLS_SHUT_WR)
    }

    /// "TLS1.3 AES-256-GCM, PSK identity alice" and the like, for logs.
    public var summary: String {
        guard isEstablished else { return "TLS handshake in progress" }
        let version = gnutls_protocol_get_name(gnutls_protocol_get_version(session)).map { String(cString: $0) } ?? "TLS"
        let cipher = gnutls_cipher_get_name(gnutls_cipher_get(session)).map { String(cString: $0) } ?? "?"
        var text = "\(version) \(cipher)"
        if let identity = gnutls_psk_server_get_username(session), credentials.role == .server,
           case .serverKeys = credentials.kind {
            text += ", PSK identity \(String(cString: identity))"
        }
        return text
    }
}
