/// Where a server listens or a client connects: `unix:/path` or `HOST:PORT`
/// (`[v6]:PORT` for IPv6 literals).
public enum SocketAddress: Equatable, CustomStringConvertible, Sendable {
    case unix(path: String)
    case tcp(host: String, port: UInt16)

    /// The path of a unix socket's address.
    public var unixPath: String? { if case .unix(let path) = self { path } else { nil } }

    public struct ParseError: Error, CustomStringConvertible {
        public let description: String
    }

    public init(parsing text: String) throws {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else {
                throw ParseError(description: "'\(text)' has no socket path; use unix:/path/to.sock")
            }
            guard path.utf8.count < 108 else {
                throw ParseError(description: "unix socket path '\(path)' is longer than 107 bytes")
            }
            self = .unix(path: path)
            return
        }
        guard let colon = text.lastIndex(of: ":") else {
            throw ParseError(description: "'\(text)' is not an address; use unix:/path or HOST:PORT (e.g. 127.0.0.1:10809)")
        }
        var host = String(text[..<colon])
        let portText = text[text.index(after: colon)...]
        guard let port = UInt16(portText) else {
            throw ParseError(description: "'\(portText)' in '\(text)' is not a port number (0-65535)")
        }
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else {
            throw ParseError(description: "'\(text)' has no host; use HOST:PORT (e.g. 127.0.0.1:\(port))")
        }
        self = .tcp(host: host, port: port)
    }

    public var description: String {
        switch self {
        case .unix(let path): return "unix:\(path)"
        case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        }
    }
}
