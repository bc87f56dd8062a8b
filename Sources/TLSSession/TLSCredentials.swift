import CGnuTLS
#if canImport(Glibc)
import Glibc
#endif

/// A failed GnuTLS call, with GnuTLS's own words for it.
public struct TLSError: Error, CustomStringConvertible {
    public let code: Int32
    public let description: String

    init(_ code: Int32, _ context: String) {
        self.code = code
        description = "\(context): \(String(cString: gnutls_strerror(code)))"
    }

    init(message: String) {
        code = 0
        description = message
    }
}

/// What a TLS endpoint proves itself with, loaded once and shared by every
/// session: X.509 certificates from a directory named as nbdkit and libnbd
/// name them, or a psktool key file. Read-only once made, so one value
/// serves all I/O threads.
public final class TLSCredentials: @unchecked Sendable {
    public enum Role: Sendable { case server, client }

    enum Kind {
        case certificates(OpaquePointer, verifyPeer: Bool)
        case serverKeys(OpaquePointer)
        case clientKey(OpaquePointer)
    }

    let role: Role
    let kind: Kind
    let priority: OpaquePointer

    /// TLS 1.3 only; PSK sessions add the PSK key exchanges (ECDHE-PSK first,
    /// for forward secrecy), as nbdkit and libnbd offer them.
    static let certificatePriority = "NORMAL:-VERS-ALL:+VERS-TLS1.3"
    static let pskPriority = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+ECDHE-PSK:+DHE-PSK:+PSK"

    private init(role: Role, kind: Kind, priority text: String) throws {
        var priority: OpaquePointer?
        let result = gnutls_priority_init(&priority, text, nil)
        guard result == GNUTLS_E_SUCCESS, let priority else {
            Self.free(kind)
            throw TLSError(result, "TLS priority \(text)")
        }
        self.role = role
        self.kind = kind
        self.priority = priority
    }

    deinit {
        gnutls_priority_deinit(priority)
        Self.free(kind)
    }

    private static func free(_ kind: Kind) {
        switch kind {
        case .certificates(let credentials, _): gnutls_certificate_free_credentials(credentials)
        case .serverKeys(let credentials): gnutls_psk_free_server_credentials(credentials)
        case .clientKey(let credentials): gnutls_psk_free_client_credentials(credentials)
        }
    }

    /// `directory` holds ca-cert.pem and the role's pair: server-cert.pem and
    /// server-key.pem, or client-cert.pem and client-key.pem (a client
    /// without its pair still verifies the server). A server that verifies
    /// its peers asks every client for a certificate the CA signed.
    public static func certificates(directory: String, role: Role, verifyPeer: Bool = true) throws -> TLSCredentials {
        var credentials: OpaquePointer?
        var result = gnutls_certificate_allocate_credentials(&credentials)
        guard result == GNUTLS_E_SUCCESS, let credentials else { throw TLSError(result, "TLS credentials") }
        let kind = Kind.certificates(credentials, verifyPeer: verifyPeer)
        let ca = "\(directory)/ca-cert.pem"
        result = gnutls_certificate_set_x509_trust_file(credentials, ca, GNUTLS_X509_FMT_PEM)
        guard result > 0 else {
            free(kind)
            throw result < 0 ? TLSError(result, ca) : TLSError(message: "\(ca): no CA certificate in it")
        }
        let prefix = role == .server ? "server" : "client"
        let certificate = "\(directory)/\(prefix)-cert.pem", key = "\(directory)/\(prefix)-key.pem"
        if role == .server || access(certificate, F_OK) == 0 {
            result = gnutls_certificate_set_x509_key_file(credentials, certificate, key, GNUTLS_X509_FMT_PEM)
            guard result == GNUTLS_E_SUCCESS else {
                free(kind)
                throw TLSError(result, "\(certificate) with \(key)")
            }
        }
        return try TLSCredentials(role: role, kind: kind, priority: certificatePriority)
    }

    /// A server's keys in psktool's format, one `identity:hex-key` a line.
    public static func serverKeys(file: String) throws -> TLSCredentials {
        guard access(file, R_OK) == 0 else {
            throw TLSError(message: "\(file): cannot read the PSK file (\(String(cString: strerror(errno))))")
        }
        var credentials: OpaquePointer?
        var result = gnutls_psk_allocate_server_credentials(&credentials)
        guard result == GNUTLS_E_SUCCESS, let credentials else { throw TLSError(result, "TLS PSK credentials") }
        result = gnutls_psk_set_server_credentials_file(credentials, file)
        guard result == GNUTLS_E_SUCCESS else {
            gnutls_psk_free_server_credentials(credentials)
            throw TLSError(result, file)
        }
        return try TLSCredentials(role: .server, kind: .serverKeys(credentials), priority: pskPriority)
    }

    /// A client's key: `identity`'s line of a psktool file.
    public static func clientKey(file: String, identity: String) throws -> TLSCredentials {
        guard let key = try PSKFile(path: file).key(for: identity) else {
            throw TLSError(message: "\(file): no key for the identity \(identity)")
        }
        var credentials: OpaquePointer?
        var result = gnutls_psk_allocate_client_credentials(&credentials)
        guard result == GNUTLS_E_SUCCESS, let credentials else { throw TLSError(result, "TLS PSK credentials") }
        result = key.withUnsafeBufferPointer { bytes in
            var datum = gnutls_datum_t(data: UnsafeMutablePointer(mutating: bytes.baseAddress), size: UInt32(bytes.count))
            return gnutls_psk_set_client_credentials(credentials, identity, &datum, GNUTLS_PSK_KEY_RAW)
        }
        guard result == GNUTLS_E_SUCCESS else {
            gnutls_psk_free_client_credentials(credentials)
            throw TLSError(result, "\(file): the key for \(identity)")
        }
        return try TLSCredentials(role: .client, kind: .clientKey(credentials), priority: pskPriority)
    }

    /// Puts these credentials on a new session.
    func apply(to session: OpaquePointer) -> Int32 {
        var result = gnutls_priority_set(session, priority)
        guard result == GNUTLS_E_SUCCESS else { return result }
        switch kind {
        case .certificates(let credentials, let verifyPeer):
            result = gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(credentials))
            guard result == GNUTLS_E_SUCCESS else { return result }
            if role == .server {
                gnutls_certificate_server_set_request(session, verifyPeer ? GNUTLS_CERT_REQUIRE : GNUTLS_CERT_IGNORE)
            }
            // The chain is checked against the CA; names are not: a cluster
            // CA signs only the cluster's nodes.
            if role == .client || verifyPeer { gnutls_session_set_verify_cert(session, nil, 0) }
        case .serverKeys(let credentials):
            result = gnutls_credentials_set(session, GNUTLS_CRD_PSK, UnsafeMutableRawPointer(credentials))
        case .clientKey(let credentials):
            result = gnutls_credentials_set(session, GNUTLS_CRD_PSK, UnsafeMutableRawPointer(credentials))
        }
        return result
    }
}

/// psktool's key file: `identity:hex-key` lines.
struct PSKFile {
    let lines: [Substring]

    init(path: String) throws {
        guard let file = fopen(path, "r") else {
            throw TLSError(message: "\(path): cannot read the PSK file (\(String(cString: strerror(errno))))")
        }
        defer { fclose(file) }
        var text: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = fread(&chunk, 1, chunk.count, file)
            if count <= 0 { break }
            text += chunk[0..<count]
        }
        lines = String(decoding: text, as: UTF8.self).split(separator: "\n")
    }

    func key(for identity: String) -> [UInt8]? {
        for line in lines {
            guard let colon = line.lastIndex(of: ":"), line[..<colon] == identity else { continue }
            return Self.bytes(hex: line[line.index(after: colon)...].trimmingSuffix())
        }
        return nil
    }

    static func bytes(hex: Substring) -> [UInt8]? {
        let digits = Array(hex.utf8)
        guard digits.count % 2 == 0, !digits.isEmpty else { return nil }
        var bytes: [UInt8] = []
        for i in stride(from: 0, to: digits.count, by: 2) {
            guard let high = nibble(digits[i]), let low = nibble(digits[i + 1]) else { return nil }
            bytes.append(high << 4 | low)
        }
        return bytes
    }

    static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}

extension Substring {
    func trimmingSuffix() -> Substring {
        var end = endIndex
        while end > startIndex, self[index(before: end)].isWhitespace { end = index(before: end) }
        return self[startIndex..<end]
    }
}
