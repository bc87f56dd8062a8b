import DeviceMapper
import Foundation
import KernelNBD
import Logging
import Synchronization
import Syscalls
import TLSSession
#if canImport(Glibc)
import Glibc
#endif

/// The host's side of a volume: it holds `/dev/nbdX` and keeps it connected
/// to the volume's engine. When the kernel gives up on a connection
/// (LINK_DEAD: a request outlived the I/O timeout, or the engine closed it),
/// the frontend opens a new one and hands it over; while the engine does not
/// answer, the kernel holds the device's I/O (dead-connection timeout) and
/// the frontend keeps trying, so an engine that is restarted (by hand, by its
/// unit, or elsewhere through `replacement`) gets the device back.
public final class DeviceFrontend: @unchecked Sendable {
    /// Asked when the engine does not answer: the endpoint of an engine that
    /// will (started elsewhere, say), or nil to keep trying the same one.
    public typealias Replacement = @Sendable (_ lost: EngineEndpoint, _ failure: String) -> EngineEndpoint?

    /// Where the device stands with its engine, for `keel volume show`.
    public enum Status: Sendable, Equatable {
        case connected(EngineEndpoint)
        /// The engine does not answer; the kernel holds the device's I/O.
        case waiting(EngineEndpoint, failure: String)
        /// No engine past the dead-connection timeout: the kernel fails the device's I/O.
        case failing(EngineEndpoint, failure: String)
    }
    public typealias StatusObserver = @Sendable (Status) -> Void

    let device: KernelDevice
    /// `keel-<volume>`: the device-mapper device over /dev/nbdX that the host mounts, or nil.
    private let mapperName: String?
    /// Set once attached, with `mapperName`.
    var linear: LinearDevice?
    /// While an engine switch holds the device's I/O: since when, until when at most (monotonic seconds), and whether the suspend is done.
    let hold = Mutex<(since: Double, until: Double, established: Bool)?>(nil)
    /// The kernel's dead-link reports since the hold began: a switch waits for every link's.
    var switchReports: KernelNBD.DeadLinks?
    /// Taken by whatever hands the kernel new connections: the watcher's reconnects and a switch.
    let relinking = NSLock()
    private let connectTimeout: Int32
    /// TLS for links to an engine over TCP (kTLS once negotiated); unix links stay plaintext.
    private let tls: TLSCredentials?
    let logger: Logger
    private let replacement: Replacement?
    let observer: StatusObserver?
    let endpoint: Mutex<EngineEndpoint>
    private let running = Atomic<Bool>(false)
    private var watcher: PosixThread?

    /// `connectTimeout`: milliseconds a connection and its handshake may take. With
    /// `mapperName`, the host's device is a device-mapper linear device of that name over
    /// /dev/nbdX, which an engine switch suspends.
    public init(device: KernelDevice, engine: EngineEndpoint, connectTimeout: Int32 = 3000, tls: TLSCredentials? = nil,
                mapperName: String? = nil, logger: Logger, replacement: Replacement? = nil, observer: StatusObserver? = nil) {
        self.device = device
        self.mapperName = mapperName
        self.connectTimeout = connectTimeout
        self.tls = tls
        self.logger = logger
        self.replacement = replacement
        self.observer = observer
        endpoint = Mutex(engine)
    }

    public var engine: EngineEndpoint { endpoint.withLock { $0 } }

    /// A third of the I/O timeout (at least 2 s): an engine's node cut off is
    /// noticed that early, so its replacement starts while the kernel still
    /// waits for the requests in flight, not after.
    private var unanswered: UInt32 { UInt32(max(2, device.settings.ioTimeout / 3) * 1000) }

    /// The volume's size in bytes, once attached.
    public var size: UInt64 { device.size ?? 0 }

    /// Connects every link, attaches the device and starts replacing dead
    /// links; returns the device path. An engine that does not answer now is
    /// an error here (nothing is attached), not a wait.
    public func start() throws -> String {
        let events = try KernelNBD.DeadLinks()
        let engine = self.engine
        var links: [EngineLink] = []
        do {
            for _ in 0..<device.settings.connections { links.append(try link(to: engine)) }
        } catch {
            links.forEach { $0.fd.close() }
            throw error
        }
        var path = try device.attach(links)
        if let mapperName {
            do {
                let linear = try LinearDevice.create(name: mapperName, over: path, sectors: (device.size ?? 0) / 512)
                self.linear = linear
                logger.notice("\(linear.path) maps \(path): mount it, not \(path), so that its engine can switch under it")
                path = linear.path
            } catch {
                device.detach()
                throw error
            }
        }
        observer?(.connected(engine))
        running.store(true, ordering: .releasing)
        watcher = try PosixThread(name: "keel-frontend") { [self] in watch(events) }
        return path
    }

    /// Stops replacing links, drains the device's I/O and detaches it.
    public func stop() {
        running.store(false, ordering: .releasing)
        watcher?.join()
        watcher = nil
        if let linear {
            if hold.withLock({ $0 }) != nil { try? linear.resume() }
            do { try linear.remove() } catch { logger.warning("cannot remove \(linear.path): \(error)") }
        }
        device.detach()
    }

    private var isRunning: Bool { running.load(ordering: .acquiring) }

    func link(to engine: EngineEndpoint) throws -> EngineLink {
        let overTCP = if case .tcp = engine.address { true } else { false }
        return try EngineLink.open(engine, timeout: connectTimeout, unanswered: unanswered, tls: overTCP ? tls : nil)
    }

    /// Notifications say when; the probes say how many (a lost notification
    /// costs at most one tick).
    private func watch(_ events: KernelNBD.DeadLinks) {
        while isRunning {
            do {
                let reported = try events.next(waitingUpTo: 250).filter { $0 == device.index }.count
                device.noteDeadLinkReports(reported)
            } catch NetlinkError.kernel(let errno, _) where errno == ENOBUFS {
                logger.warning("the kernel's dead-link notifications overflowed; checking the connections")
            } catch {
                logger.error("cannot read the kernel's dead-link notifications: \(error)")
                usleep(250_000)
            }
            if releaseExpiredHold() { continue }
            if device.deadLinks() > 0 && !isHeld { reconnect() }
        }
    }

    /// Until every dead slot has a new connection or the frontend stops.
    private func reconnect() {
        guard let index = device.index else { return }
        let started = monotonicSeconds()
        var lastFailure: String?
        var warnedAboutDeadline = false
        while isRunning && !isHeld {
            relinking.lock()
            defer { relinking.unlock() }
            let dead = device.deadLinks()
            if dead == 0 { break }
            let engine = self.engine
            do {
                var links: [EngineLink] = []
                defer { links.forEach { $0.fd.close() } }
                for _ in 0..<dead { links.append(try link(to: engine)) }
                let tls = links.allSatisfy(\.encrypted) ? " over TLS (kTLS)" : ""
                let taken = try device.replaceDeadLinks(with: links)
                links = []
                let waited = monotonicSeconds() - started
                let pause = waited >= 1 ? " after \(Int(waited)) s without one" : ""
                logger.notice("/dev/nbd\(index): \(taken) new connection(s) to engine \(engine)\(tls)\(pause)")
                if lastFailure != nil { observer?(.connected(engine)) }
                lastFailure = nil
                continue
            } catch {
                let failure = "\(error)"
                if failure != lastFailure {
                    logger.warning("/dev/nbd\(index): engine \(engine) does not answer: \(failure)")
                    observer?(warnedAboutDeadline ? .failing(engine, failure: failure) : .waiting(engine, failure: failure))
                }
                lastFailure = failure
                if let next = replacement?(engine, failure), next != engine {
                    // The kernel would keep sending to the old engine's links that look alive
                    // (an idle one never times out): retire them, so all go to the new one.
                    logger.notice("/dev/nbd\(index): the volume's engine moves from \(engine) to \(next)")
                    endpoint.withLock { $0 = next }
                    device.retireLinks()
                    continue
                }
            }
            let waited = monotonicSeconds() - started
            if !warnedAboutDeadline && waited > Double(device.settings.deadConnectionTimeout) {
                warnedAboutDeadline = true
                logger.error("/dev/nbd\(index): no engine for \(Int(waited)) s, past the dead-connection timeout: the kernel fails the device's I/O until one answers at \(engine)")
                observer?(.failing(engine, failure: lastFailure ?? "no answer"))
            }
            for _ in 0..<5 where isRunning && !isHeld { usleep(50_000) }
        }
    }
}
