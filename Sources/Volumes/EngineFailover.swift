import DeviceFrontend
import Foundation
import Logging
import Synchronization
import Syscalls

/// Where a device frontend gets a new engine when its engine stops
/// answering, and the only one that restarts it: the place it ran first
/// (restarted there, if that place answers), then the others in their order.
/// An engine still running but unanswering for `hungAfter` seconds is killed
/// and started again. The new engine claims the replicas with a newer epoch,
/// which fences the old one wherever it still runs.
public final class EngineFailover: Sendable {
    private let places: [any EnginePlace]
    private let spec: Mutex<EngineSpec>
    private let hungAfter: Double
    private let logger: Logger
    private let calls = CancellableCalls()
    /// Since when the current engine has not answered (nil: it answers, or was just started).
    private let unansweredSince = Mutex<Double?>(nil)

    /// A migration's engine B standing by takes over from a lost engine: its NBD address when it serves now.
    /// (This node's engine has the same hook in its `LocalPlace`, which restarts it.)
    private let standbyTakesOver: (@Sendable () -> String?)?

    public init(places: [any EnginePlace], spec: EngineSpec, hungAfter: Double, logger: Logger,
                standbyTakesOver: (@Sendable () -> String?)? = nil) {
        precondition(!places.isEmpty, "a failover needs a place to start engines")
        self.places = places
        self.standbyTakesOver = standbyTakesOver
        self.spec = Mutex(spec)
        self.hungAfter = hungAfter
        self.logger = logger
    }

    /// The volume's size, known once the device is attached.
    public func deviceAttached(size: UInt64) { if size > 0 { spec.withLock { $0.size = size } } }

    /// The device got connections to its engine.
    public func engineAnswered() { unansweredSince.withLock { $0 = nil } }

    /// The frontend stops: a start under way (up to minutes) must not hold it.
    public func cancel() { calls.cancel() }

    /// The engine that serves the volume now, or nil when no place could start one.
    /// Without a lost engine (the first attach), the places in their order.
    public func engine(replacing lost: EngineEndpoint?, failure: String = "") -> EngineEndpoint? {
        if lost != nil, let address = standbyTakesOver?(), let endpoint = try? SocketAddress(parsing: address) {
            unansweredSince.withLock { $0 = nil }
            let volume = spec.withLock { $0.volume }
            logger.notice("engine of \(volume): a migration's engine B at \(address) took over")
            return EngineEndpoint(address: endpoint, exportName: volume)
        }
        let hung = lost != nil && unansweredFor() >= hungAfter
        for place in lost.map(ordered(after:)) ?? places {
            if calls.isCancelled { return nil }
            guard place.answers(calls) else {
                logger.warning("engine \(place.name) does not answer; trying the next")
                continue
            }
            let restart = hung && lost.map(place.ran) == true
            do {
                let started = try place.startEngine(spec.withLock { $0 }, restartRunning: restart, calls)
                if !started.alreadyRunning || started.endpoint != lost { unansweredSince.withLock { $0 = nil } }
                let verb = started.alreadyRunning ? "runs" : restart ? "restarted (it did not answer for \(Int(hungAfter)) s)" : "started"
                let volume = spec.withLock { $0.volume }
                let detail = started.detail.isEmpty ? "" : ", \(started.detail)"
                logger.notice("engine of \(volume) \(verb) on \(place.name) at \(started.endpoint.address)\(detail)")
                return started.endpoint
            } catch {
                logger.warning("\(place.name) could not start the engine: \((error as? KeelError)?.message ?? "\(error)")")
            }
        }
        if calls.isCancelled { return nil }
        logger.error("no place could start the engine (\(places.map(\.name).joined(separator: ", "))); trying again")
        return nil
    }

    private func unansweredFor() -> Double {
        let now = monotonicSeconds()
        return now - unansweredSince.withLock { since in
            if since == nil { since = now }
            return since!
        }
    }

    /// The place the lost engine ran first, then the rest in order.
    private func ordered(after lost: EngineEndpoint) -> [any EnginePlace] {
        guard let current = places.firstIndex(where: { $0.ran(lost) }) else { return places }
        return Array(places[current...] + places[..<current])
    }
}
