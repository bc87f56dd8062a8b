import NBDProtocol
import Synchronization

/// Requests the engine answered, for `keel status`. Relaxed atomics: each is
/// one uncontended add per request, and readers only want a recent value.
public final class IOCounters: Sendable {
    public let reads = Atomic<UInt64>(0)
    public let writes = Atomic<UInt64>(0)
    public let readBytes = Atomic<UInt64>(0)
    public let writtenBytes = Atomic<UInt64>(0)
    public let flushes = Atomic<UInt64>(0)
    public let errors = Atomic<UInt64>(0)

    public init() {}

    func count(_ command: CommandType, length: UInt32, error: NBDError?) {
        if error != nil {
            errors.add(1, ordering: .relaxed)
            return
        }
        switch command {
        case .read:
            reads.add(1, ordering: .relaxed)
            readBytes.add(UInt64(length), ordering: .relaxed)
        case .write, .writeZeroes, .trim:
            writes.add(1, ordering: .relaxed)
            writtenBytes.add(UInt64(length), ordering: .relaxed)
        case .flush:
            flushes.add(1, ordering: .relaxed)
        case .cache, .blockStatus, .disconnect:
            break
        }
    }
}
