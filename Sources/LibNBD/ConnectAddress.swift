import Syscalls

extension NBDClient {
    /// Connects to a unix or TCP address.
    public func connect(to address: SocketAddress) throws {
        switch address {
        case .unix(let path): try connect(unixSocket: path)
        case .tcp(let host, let port): try connect(host: host, port: port)
        }
    }
}
