import CLibNBD
import Synchronization

/// TLS on the links this process opens to NBD servers of Keel's own (an
/// engine's to its replicas, a snapshot export's): libnbd's own TLS client,
/// required once configured, with the node's client certificate
/// (client-cert.pem, client-key.pem and ca-cert.pem in a directory, as
/// `keel cert issue` writes them) or a PSK identity from a psktool file.
/// Every `connect(to:)` applies it, so each way a link is made carries it.
public struct LinkTLS: Sendable, Equatable {
    public enum Credentials: Sendable, Equatable {
        case certificates(directory: String)
        case preSharedKey(file: String, username: String)
    }

    public let credentials: Credentials?

    public static let off = LinkTLS(credentials: nil)

    public init(credentials: Credentials?) {
        self.credentials = credentials
    }

    private static let configured = Mutex(LinkTLS.off)

    /// From now on, for every link this process opens.
    public static func use(_ tls: LinkTLS) {
        configured.withLock { $0 = tls }
    }

    public static var current: LinkTLS { configured.withLock { $0 } }
}

extension NBDClient {
    /// Makes the coming connection require TLS with these credentials
    /// (a server that does not speak it is refused, not used in plaintext).
    public func requireTLS(_ credentials: LinkTLS.Credentials) throws {
        try check(nbd_set_tls(handle, LIBNBD_TLS_REQUIRE))
        switch credentials {
        case .certificates(let directory):
            try check(nbd_set_tls_certificates(handle, directory))
            try check(nbd_set_tls_verify_peer(handle, true))
        case .preSharedKey(let file, let username):
            try check(nbd_set_tls_psk_file(handle, file))
            try check(nbd_set_tls_username(handle, username))
        }
    }
}
