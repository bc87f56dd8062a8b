import ReplicaIdentity
import Synchronization
import Syscalls

/// The replica's epoch as its data path sees it, and the requests in flight
/// by the session that sent them.
///
/// The epoch lives here, under the fence's own lock, so that deciding on a
/// request and a claim moving the epoch on can never interleave, and so that
/// no request waits for the store's lock (held across SQLite's fsyncs). A
/// claim is persisted by the store first, then `advance`d here, before the
/// claiming engine's handshake is answered.
///
/// A request of an epoch older than the fence's is refused before it touches
/// the disk; so is one of a newer epoch that no claim under way is persisting
/// (a standby session's, before its engine claims). A request of the current epoch waits until every request of older
/// epochs already on its way to the disk has finished, so that no write of a
/// fenced engine can land after the new engine's I/O. Snapshot readers
/// (`ReplicaSession.snapshot`) are fenced by no epoch.
///
/// `hold` stops the data path for a change of the chain: new requests wait,
/// and it returns once none is in flight.
public final class EpochFence: Sendable {
    public enum Admission: Equatable {
        case admit
        case reject
        case wait
    }

    private struct State {
        var epoch: UInt64
        /// Epochs whose claim is being persisted, by the claims under way.
        var claiming: [UInt64: Int] = [:]
        var inFlight: [UInt64: Int] = [:]
        var held = false
        /// The chain on disk may differ from the one in memory: nothing is served any more.
        var broken = false
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

    /// A claim of `epoch` is being persisted: its sessions' requests wait for it (another
    /// connection of the same engine may have been answered already). Pair with `endClaim`.
    public func beginClaim(_ epoch: UInt64) {
        state.withLock { $0.claiming[epoch, default: 0] += 1 }
    }

    public func endClaim(_ epoch: UInt64) {
        state.withLock { s in
            let left = s.claiming[epoch, default: 1] - 1
            s.claiming[epoch] = left > 0 ? left : nil
        }
    }

    public func enter(session: UInt64) -> Admission {
        state.withLock { s in
            if s.broken { return .reject }
            if s.held { return .wait }
            if case .engine(let epoch) = ReplicaSession(session) {
                if epoch < s.epoch { return .reject }
                // Newer than the fence: its claim is still being persisted, or it is a
                // standby session whose engine has not claimed (nor may it send yet).
                if epoch > s.epoch { return s.claiming[epoch] != nil ? .wait : .reject }
                if s.inFlight.keys.contains(where: { $0 < epoch }) { return .wait }
            }
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

    /// Holds new requests; true once none is in flight. False (and released)
    /// if some are still in flight after `seconds`.
    public func hold(seconds: Double) -> Bool {
        state.withLock { $0.held = true }
        if pollUntil(seconds: seconds, { state.withLock { $0.inFlight.isEmpty } }) { return true }
        release()
        return false
    }

    public func release() {
        state.withLock { $0.held = false }
    }

    /// Refuses every request from now on: the replica must be restarted.
    public func breakForGood() {
        state.withLock { $0.broken = true }
    }
}
