#if canImport(Glibc)
import Glibc
#endif

/// systemd's readiness protocol (`Type=notify`): a datagram to `$NOTIFY_SOCKET`.
/// Does nothing when the process was not started by a service manager.
public enum ServiceManager {
    /// Sends `state` (e.g. "READY=1", "STOPPING=1", "STATUS=…"); newline-separated assignments.
    public static func notify(_ state: String) {
        guard let variable = getenv("NOTIFY_SOCKET") else { return }
        var path = String(cString: variable)
        guard !path.isEmpty, path.utf8.count < 108 else { return }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let abstract = path.hasPrefix("@")
        if abstract { path.removeFirst() }
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { sun in
            let start = abstract ? 1 : 0
            for (i, byte) in bytes.enumerated() { sun[start + i] = byte }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + (abstract ? 1 : 0))
        _ = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sockaddr in
                Array(state.utf8).withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, 0, sockaddr, length) }
            }
        }
    }
}
