import GRPCNIOTransportHTTP2
import Synchronization
import Syscalls

/// TLS on the control API (gRPC over NIOSSL): both ends present a
/// certificate the cluster CA signed, from a directory as `keel cert issue`
/// writes it (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
/// client-key.pem). NIOSSL has no PSK, so control needs the CA even where the
/// data path uses a PSK. Names are not checked, as on the data path: the
/// cluster CA signs only the cluster's nodes, and unix sockets have none.
public struct ControlTLS: Sendable, Equatable {
    public let certificates: String?

    public static let plaintext = ControlTLS(certificates: nil)

    public init(certificates: String?) {
        self.certificates = certificates
    }

    /// What a process's control calls use, by transport: a command may call a
    /// node agent over TCP (TLS, with the node's credentials) and this node's
    /// device frontend over a unix socket (plaintext) in turn.
    public struct ForCalls: Sendable, Equatable {
        public var overTCP: ControlTLS
        public var overUnix: ControlTLS

        public init(overTCP: ControlTLS, overUnix: ControlTLS) {
            self.overTCP = overTCP
            self.overUnix = overUnix
        }

        public func tls(to address: Syscalls.SocketAddress) -> ControlTLS {
            switch address {
            case .unix: return overUnix
            case .tcp: return overTCP
            }
        }
    }

    private static let forCalls = Mutex(ForCalls(overTCP: .plaintext, overUnix: .plaintext))

    /// What this process's control calls (to engines and replicas) use from now on, on either transport.
    public static func useForCalls(_ tls: ControlTLS) {
        useForCalls(ForCalls(overTCP: tls, overUnix: tls))
    }

    public static func useForCalls(_ tls: ForCalls) {
        forCalls.withLock { $0 = tls }
    }

    /// What a call to `address` uses.
    public static func calls(to address: Syscalls.SocketAddress) -> ControlTLS {
        forCalls.withLock { $0.tls(to: address) }
    }

    private func file(_ name: String) -> String { certificates! + "/" + name }

    private var trustRoots: TLSConfig.TrustRootsSource {
        .certificates([.file(path: file("ca-cert.pem"), format: .pem)])
    }

    /// A server that refuses every client without a certificate the CA signed.
    public var serverSecurity: HTTP2ServerTransport.Posix.TransportSecurity {
        guard certificates != nil else { return .plaintext }
        return .mTLS(certificateChain: [.file(path: file("server-cert.pem"), format: .pem)],
                     privateKey: .file(path: file("server-key.pem"), format: .pem)) {
            $0.trustRoots = trustRoots
            $0.clientCertificateVerification = .noHostnameVerification
        }
    }

    public var clientSecurity: HTTP2ClientTransport.Posix.TransportSecurity {
        guard certificates != nil else { return .plaintext }
        return .mTLS(certificateChain: [.file(path: file("client-cert.pem"), format: .pem)],
                     privateKey: .file(path: file("client-key.pem"), format: .pem)) {
            $0.trustRoots = trustRoots
            $0.serverCertificateVerification = .noHostnameVerification
        }
    }
}
