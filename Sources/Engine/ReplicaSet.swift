import Logging
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// The volume's replicas and their modes, shared by all I/O threads.
///
/// Modes form a small state machine: `rw → err` when a replica fails an
/// I/O or its connection dies; `err` is final for that replica instance
/// (a replacement joins through rebuild, which comes with the control API).
public final class ReplicaSet: @unchecked Sendable {
    public enum Mode: String, Sendable {
        case rw = "RW"
        case err = "ERR"
    }

    public enum Health: String, Sendable {
        case healthy, degraded, faulted
    }

    public let addresses: [SocketAddress]
    private var modes: [Mode]
    private var reasons: [String]
    private var mutex = pthread_mutex_t()
    private let logger: Logger

    public init(addresses: [SocketAddress], logger: Logger) {
        self.addresses = addresses
        modes = Array(repeating: .rw, count: addresses.count)
        reasons = Array(repeating: "", count: addresses.count)
        self.logger = logger
        pthread_mutex_init(&mutex, nil)
    }

    deinit { pthread_mutex_destroy(&mutex) }

    public func mode(_ index: Int) -> Mode {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return modes[index]
    }

    /// Each replica's mode and, for ERR, why.
    public var states: [(address: SocketAddress, mode: Mode, reason: String)] {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return addresses.indices.map { (addresses[$0], modes[$0], reasons[$0]) }
    }

    public var health: Health {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        let healthy = modes.filter { $0 == .rw }.count
        return healthy == modes.count ? .healthy : healthy == 0 ? .faulted : .degraded
    }

    /// Marks a replica failed (once) and says what that means for the volume.
    public func fail(_ index: Int, reason: String) {
        pthread_mutex_lock(&mutex)
        guard modes[index] != .err else { pthread_mutex_unlock(&mutex); return }
        modes[index] = .err
        reasons[index] = reason
        let healthy = modes.filter { $0 == .rw }.count
        pthread_mutex_unlock(&mutex)
        let state = healthy == 0 ? "faulted: no healthy replica, I/O fails with EIO" : "degraded: \(healthy) of \(modes.count) replicas healthy"
        logger.error("replica \(addresses[index]) failed (\(reason)); volume \(state)")
    }
}
