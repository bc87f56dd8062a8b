import CGnuTLS
#if canImport(Glibc)
import Glibc
#endif

extension TLSSession {
    public enum KernelHandOver: Equatable {
        /// The socket encrypts and decrypts from now on; this session must not be used again.
        case done
        /// Nothing was changed: the session goes on in user space.
        case unavailable(String)
        /// This kernel has no TLS upper layer (no tls module): no socket will do better.
        case kernelLacksTLS
        /// The socket is half set up and can carry neither kind of record.
        case broken(String)
    }

    /// Whether the kernel could take this session's records: TLS 1.3 with
    /// AES-GCM, nothing received and not yet decrypted.
    public var kernelCanTakeOver: Bool {
        guard isEstablished, gnutls_protocol_get_version(session) == GNUTLS_TLS1_3,
              gnutls_record_check_pending(session) == 0, !hasBufferedInput, outgoing.isEmpty else { return false }
        let cipher = gnutls_cipher_get(session)
        return cipher == GNUTLS_CIPHER_AES_128_GCM || cipher == GNUTLS_CIPHER_AES_256_GCM
    }

    /// Hands the record layer to the kernel (kTLS) on `socket`, a TCP
    /// socket with nothing of this session in flight either way: every
    /// record sent so far has left, none has arrived past what was fed.
    public func handOverToKernel(socket: Int32) -> KernelHandOver {
        guard kernelCanTakeOver else { return .unavailable("not a TLS 1.3 AES-GCM session at a record boundary") }
        if keel_ktls_attach(socket) != 0 {
            return errno == ENOENT ? .kernelLacksTLS : .unavailable("TCP_ULP tls: \(String(cString: strerror(errno)))")
        }
        for (direction, read) in [(keel_tls_tx, UInt32(0)), (keel_tls_rx, UInt32(1))] {
            var mac = gnutls_datum_t(), iv = gnutls_datum_t(), key = gnutls_datum_t()
            var sequence = [UInt8](repeating: 0, count: 8)
            let state = gnutls_record_get_state(session, read, &mac, &iv, &key, &sequence)
            guard state == GNUTLS_E_SUCCESS, iv.size == 12, key.size == 16 || key.size == 32 else {
                return direction == keel_tls_tx ? .unavailable("gnutls_record_get_state: \(state)")
                                                : .broken("gnutls_record_get_state: \(state)")
            }
            if keel_ktls_set(socket, direction, key.data, Int32(key.size), iv.data, sequence) != 0 {
                let reason = "SOL_TLS \(direction == keel_tls_tx ? "TLS_TX" : "TLS_RX"): \(String(cString: strerror(errno)))"
                // An attached upper layer without keys still carries plain TCP: user space may go on.
                return direction == keel_tls_tx ? .unavailable(reason) : .broken(reason)
            }
        }
        return .done
    }
}
