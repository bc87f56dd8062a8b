#if canImport(Glibc)
import Glibc
#endif

/// Requests in flight on a replica, by the epoch of the engine that sent them.
///
/// A request of an epoch older than the replica's is refused before it
/// touches the disk. A request of a newer epoch waits until every request
/// of older epochs already on its way to the disk has finished, so that no
/// write of a fenced engine can land after the new engine's I/O.
final class EpochFence: @unchecked Sendable {
    enum Admission: Equatable {
        case admit
        case reject
        case wait
    }

    private var mutex = pthread_mutex_t()
    private var inFlight: [UInt64: Int] = [:]

    init() { pthread_mutex_init(&mutex, nil) }
    deinit { pthread_mutex_destroy(&mutex) }

    func enter(session: UInt64, current: UInt64) -> Admission {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        if session < current { return .reject }
        if inFlight.keys.contains(where: { $0 < session }) { return .wait }
        inFlight[session, default: 0] += 1
        return .admit
    }

    func leave(session: UInt64) {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        let left = inFlight[session, default: 1] - 1
        inFlight[session] = left > 0 ? left : nil
    }
}
