import GRPCCore
import GRPCNIOTransportHTTP2
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Where a daemon's control API listens when nobody says otherwise: the data
/// port + 1 for TCP, `<socket>.control` beside a unix data socket. Engines find
/// their replicas' control API by this rule.
public func defaultControlAddress(forData data: Syscalls.SocketAddress) -> Syscalls.SocketAddress {
    switch data {
    case .unix(let path): return .unix(path: path + ".control")
    case .tcp(let host, let port): return .tcp(host: host, port: port &+ 1)
    }
}

public typealias ControlTransport = HTTP2ClientTransport.Posix

extension Syscalls.SocketAddress {
    /// The address for a gRPC client. A literal IP is not resolved as a
    /// name, so TLS sends no SNI for it (NIOSSL refuses IPs there).
    public var grpcTarget: any ResolvableTarget {
        switch self {
        case .unix(let path): return .unixDomainSocket(path: path)
        case .tcp(let host, let port):
            var scratch = in6_addr()
            if inet_pton(AF_INET, host, &scratch) == 1 { return .ipv4(host: host, port: Int(port)) }
            if inet_pton(AF_INET6, host, &scratch) == 1 { return .ipv6(host: host, port: Int(port)) }
            return .dns(host: host, port: Int(port))
        }
    }

    /// The address for a gRPC server to bind.
    public var grpcBindTarget: GRPCNIOTransportCore.SocketAddress {
        switch self {
        case .unix(let path): return .unixDomainSocket(path: path)
        case .tcp(let host, let port): return host.contains(":") ? .ipv6(host: host, port: Int(port))
                                                                  : .ipv4(host: host, port: Int(port))
        }
    }
}

/// Runs `body` with a client connected to a control API, over TLS when
/// `ControlTLS.calls(to:)` has certificates for that address.
public func withControlClient<T: Sendable>(
    _ address: Syscalls.SocketAddress, _ body: (GRPCClient<ControlTransport>) async throws -> T
) async throws -> T {
    try await withGRPCClient(transport: .http2NIOPosix(target: address.grpcTarget,
                                                       transportSecurity: ControlTLS.calls(to: address).clientSecurity)) {
        try await body($0)
    }
}
