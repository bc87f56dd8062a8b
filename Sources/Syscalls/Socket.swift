#if canImport(Glibc)
import Glibc
#endif

/// Blocking socket setup: listening, connecting, options. The data path
/// itself runs on io_uring, not here.
public enum Socket {
    /// Opens a listening socket. A unix socket path left behind by an
    /// earlier run is replaced only when nothing listens on it any more.
    public static func listen(on address: SocketAddress, backlog: Int32 = 1024) throws -> FileDescriptor {
        switch address {
        case .unix(let path):
            let fd = try make(domain: AF_UNIX)
            do {
                try removeStaleUnixSocket(at: path)
                try withUnixAddress(path) { try bindOrThrow(fd, $0, $1, address) } as Void
                // Only its owner (root, for the daemons) may connect: a socket is a way into the volume.
                guard chmod(path, 0o600) == 0 else { throw SystemError.current("chmod \(path)") }
                try startListening(fd, backlog)
                return fd
            } catch { fd.close(); throw error }
        case .tcp(let host, let port):
            return try withResolved(host: host, port: port, passive: true) { family, sa, len in
                let fd = try make(domain: family)
                do {
                    var one: Int32 = 1
                    setsockopt(fd.rawValue, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
                    try bindOrThrow(fd, sa, len, address)
                    try startListening(fd, backlog)
                    return fd
                } catch { fd.close(); throw error }
            }
        }
    }

    /// Connects a blocking stream socket. With `timeout` (milliseconds), a
    /// peer that does not answer (a node cut off sends no refusal) fails
    /// with ETIMEDOUT then instead of after the system's SYN retries.
    public static func connect(to address: SocketAddress, timeout: Int32? = nil) throws -> FileDescriptor {
        switch address {
        case .unix(let path):
            let fd = try make(domain: AF_UNIX)
            do {
                try withUnixAddress(path) { sa, len in try connect(fd, sa, len, address, timeout) }
                return fd
            } catch { fd.close(); throw error }
        case .tcp(let host, let port):
            return try withResolved(host: host, port: port, passive: false) { family, sa, len in
                let fd = try make(domain: family)
                do {
                    try connect(fd, sa, len, address, timeout)
                    return fd
                } catch { fd.close(); throw error }
            }
        }
    }

    private static func connect(_ fd: FileDescriptor, _ sa: UnsafePointer<sockaddr>, _ len: socklen_t,
                                _ address: SocketAddress, _ timeout: Int32?) throws {
        guard let timeout else {
            _ = try retryingOnInterrupt("connect \(address)") { Glibc.connect(fd.rawValue, sa, len) }
            return
        }
        let flags = fcntl(fd.rawValue, F_GETFL)
        _ = fcntl(fd.rawValue, F_SETFL, flags | O_NONBLOCK)
        defer { _ = fcntl(fd.rawValue, F_SETFL, flags) }
        if Glibc.connect(fd.rawValue, sa, len) == 0 { return }
        guard errno == EINPROGRESS else { throw SystemError.current("connect \(address)") }
        var entry = pollfd(fd: fd.rawValue, events: Int16(POLLOUT), revents: 0)
        let ready = poll(&entry, 1, timeout)
        guard ready > 0 else {
            throw SystemError(errno: ready == 0 ? ETIMEDOUT : errno, "connect \(address): no answer within \(timeout) ms")
        }
        var failure: Int32 = 0
        var size = socklen_t(MemoryLayout<Int32>.size)
        getsockopt(fd.rawValue, SOL_SOCKET, SO_ERROR, &failure, &size)
        guard failure == 0 else { throw SystemError(errno: failure, "connect \(address)") }
    }

    /// Whether every address `address` stands for is a loopback one
    /// (127.0.0.0/8, ::1); true for unix sockets, nil if the host does not resolve.
    public static func isLoopbackOnly(_ address: SocketAddress) -> Bool? {
        guard case .tcp(let host, let port) = address else { return true }
        return try? withEachResolved(host: host, port: port, passive: true) { family, sa in
            switch family {
            case AF_INET:
                let ip = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt32(bigEndian: $0.pointee.sin_addr.s_addr) }
                return ip >> 24 == 127
            case AF_INET6:
                var loopback = in6addr_loopback
                var ip = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
                return memcmp(&ip, &loopback, MemoryLayout<in6_addr>.size) == 0
            default:
                return false
            }
        }.allSatisfy { $0 }
    }

    /// The port a TCP listener actually got (useful after binding port 0).
    public static func localPort(of fd: FileDescriptor) -> UInt16? {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd.rawValue, $0, &len) }
        }
        guard ok == 0 else { return nil }
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
            }
        case AF_INET6:
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            }
        default: return nil
        }
    }

    /// NBD is request/response with small headers: never delay them.
    public static func setNoDelay(_ fd: FileDescriptor) {
        var one: Int32 = 1
        setsockopt(fd.rawValue, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    public static func shutdown(_ fd: FileDescriptor) {
        _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_RDWR))
    }

    // MARK: - Helpers

    private static func make(domain: Int32) throws -> FileDescriptor {
        let fd = socket(domain, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError.current("socket") }
        return FileDescriptor(rawValue: fd)
    }

    private static func bindOrThrow(_ fd: FileDescriptor, _ sa: UnsafePointer<sockaddr>, _ len: socklen_t,
                                    _ address: SocketAddress) throws {
        if bind(fd.rawValue, sa, len) != 0 {
            let err = errno
            if err == EADDRINUSE {
                throw SystemError(errno: err, "cannot listen on \(address): the address is already in use by another process")
            }
            throw SystemError(errno: err, "cannot listen on \(address)")
        }
    }

    private static func startListening(_ fd: FileDescriptor, _ backlog: Int32) throws {
        guard Glibc.listen(fd.rawValue, backlog) == 0 else { throw SystemError.current("listen") }
    }

    /// Makes way for a new listener on `path` unless a live one is there.
    public static func removeStaleUnixSocket(at path: String) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard st.st_mode & S_IFMT == S_IFSOCK else {
            throw SystemError(errno: EEXIST, "cannot listen on unix:\(path): a file that is not a socket is in the way")
        }
        if (try? connect(to: .unix(path: path)))?.close() != nil {
            throw SystemError(errno: EADDRINUSE, "cannot listen on unix:\(path): another process is listening there")
        }
        unlink(path)
    }

    private static func withUnixAddress<T>(_ path: String,
                                           _ body: (UnsafePointer<sockaddr>, socklen_t) throws -> T) throws -> T {
        var sun = sockaddr_un()
        sun.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &sun.sun_path) { raw in
            raw.copyBytes(from: bytes)
        }
        return try withUnsafePointer(to: &sun) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                try body($0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
    }

    /// getaddrinfo's list for a stream socket; free it with freeaddrinfo.
    private static func resolve(host: String, port: UInt16, passive: Bool) throws -> UnsafeMutablePointer<addrinfo> {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            throw SystemError(errno: EINVAL, "cannot resolve '\(host)': \(String(cString: gai_strerror(rc)))")
        }
        return first
    }

    private static func withEachResolved<T>(host: String, port: UInt16, passive: Bool,
                                            _ body: (Int32, UnsafePointer<sockaddr>) -> T) throws -> [T] {
        let list = try resolve(host: host, port: port, passive: passive)
        defer { freeaddrinfo(list) }
        var results: [T] = []
        var entry: UnsafeMutablePointer<addrinfo>? = list
        while let ai = entry {
            results.append(body(ai.pointee.ai_family, ai.pointee.ai_addr))
            entry = ai.pointee.ai_next
        }
        return results
    }

    private static func withResolved<T>(host: String, port: UInt16, passive: Bool,
                                        _ body: (Int32, UnsafePointer<sockaddr>, socklen_t) throws -> T) throws -> T {
        let list = try resolve(host: host, port: port, passive: passive)
        defer { freeaddrinfo(list) }
        var lastError: Error = SystemError(errno: EADDRNOTAVAIL, "no usable address for \(host)")
        var entry: UnsafeMutablePointer<addrinfo>? = list
        while let ai = entry {
            do { return try body(ai.pointee.ai_family, ai.pointee.ai_addr, ai.pointee.ai_addrlen) }
            catch { lastError = error }
            entry = ai.pointee.ai_next
        }
        throw lastError
    }
}
