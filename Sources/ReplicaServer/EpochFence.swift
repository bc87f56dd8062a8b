import Synchronization

/// The replica's epoch as its data path sees it, and the requests in flight
/// by the epoch of the engine that sent them.
///
/// The epoch lives here, under the fence's own lock, so that deciding on a
/// request and a claim moving the epoch on can never interleave, and so that
/// no request waits for the store's lock (held across SQLite's fsyncs). A
/// claim is persisted by the store first, then `advance`d here, before the
/// claiming engine's handshake is answered.
///
/// A request of an epoch older than the fence's is refused before it touches
/// the disk. A request of the current epoch waits until every request of older
/// epochs already on its way to the disk has finished, so that no write of a
/// fenced engine can land after the new engine's I/O.
public final class EpochFence: Sendable {
    public enum Admission: Equatable {
        case admit
        case reject
        case wait
    }

    private struct State {
        var epoch: UInt64
        var inFlight: [UInt64: Int] = [:]
    }

    private let state: Mutex<State>

    public init(epoch: UInt64) {
        state = Mutex(State(epoch: epoch))
    }

    public var epoch: UInt64 { state.withLock { $0.epoch } }

    /// A claim of `epoch` is durable: from now on older epochs are refused.
    public func advance(to epoch: UInt64) {
        state.withLock { $0.epoch = max($0.epoch, epoch) }
    }

    public func enter(session: UInt64) -> Admission {
        state.withLock { s in
            if session < s.epoch { return .reject }
            // Newer than the fence: its claim is still being persisted.
            if session > s.epoch { return .wait }
            if s.inFlight.keys.contains(where: { $0 < session }) { return .wait }
            s.inFlight[session, default: 0] += 1
            return .admit
        }
    }

    public func leave(session: UInt64) {
        state.withLock { s in
            let left = s.inFlight[session, default: 0] - 1
            precondition(left >= 0, "a request left the fence without having entered it")
            s.inFlight[session] = left > 0 ? left : nil
        }
    }
}
