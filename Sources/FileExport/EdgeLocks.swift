#if canImport(Glibc)
import Glibc
#endif

/// Blocks being read-modify-written, across all I/O threads. Two unaligned
/// writes that touch the same block must not both read it before either
/// writes it back, or one of them is lost.
public final class EdgeLocks: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var held = Set<UInt64>()

    public init() { pthread_mutex_init(&mutex, nil) }
    deinit { pthread_mutex_destroy(&mutex) }

    /// Takes every given block or none of them.
    public func tryLock(_ first: UInt64?, _ second: UInt64?) -> Bool {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        if let first, held.contains(first) { return false }
        if let second, held.contains(second) { return false }
        if let first { held.insert(first) }
        if let second { held.insert(second) }
        return true
    }

    public func unlock(_ first: UInt64?, _ second: UInt64?) {
        pthread_mutex_lock(&mutex)
        if let first { held.remove(first) }
        if let second { held.remove(second) }
        pthread_mutex_unlock(&mutex)
    }
}
