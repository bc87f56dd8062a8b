import Syscalls

extension NBDClient {
    /// Connects to a unix or TCP address, over TLS when `LinkTLS` says so.
    public func connect(to address: SocketAddress) throws {
        if let credentials = LinkTLS.current.credentials { try requireTLS(credentials) }
        switch address {
        case .unix(let path): try connect(unixSocket: path)
        case .tcp(let host, let port): try connect(host: host, port: port)
        }
    }
}
