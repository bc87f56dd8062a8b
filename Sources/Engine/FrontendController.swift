import KernelNBD
import Logging
import NBDServer
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Turns the kernel frontend on and off while the engine runs: enable makes
/// new socketpairs, has the running server adopt the engine's ends and
/// attaches the device; disable waits for the kernel's requests in flight to
/// be answered, then detaches it. The replicas and the NBD listener are not
/// touched either way.
public final class FrontendController: @unchecked Sendable {
    public struct Settings: Sendable {
        public var volume: String
        public var size: UInt64
        public var connections: Int
        public var ioTimeout: UInt64
        public var deadConnectionTimeout: UInt64
        /// The device to attach (`/dev/nbd<index>`); nil lets the kernel pick.
        public var device: UInt32?

        public init(volume: String, size: UInt64, connections: Int, ioTimeout: UInt64, deadConnectionTimeout: UInt64,
                    device: UInt32? = nil) {
            self.device = device
            self.volume = volume
            self.size = size
            self.connections = connections
            self.ioTimeout = ioTimeout
            self.deadConnectionTimeout = deadConnectionTimeout
        }
    }

    private let settings: Settings
    private let logger: Logger
    private struct State {
        var server: Server<EngineDevice>?
        var frontend: KernelFrontend?
        /// Replaces dead links; started with the first attach, for the engine's life.
        var watcher: PosixThread?
        /// The engine is shutting down: no more attaching.
        var stopping = false
    }

    private let state = Mutex(State())
    /// Apart from `state`, which a drain holds for seconds: status calls read this.
    private let attachedDevice = Mutex<String?>(nil)
    private let watching = Atomic<Bool>(false)

    public init(settings: Settings, logger: Logger) {
        self.settings = settings
        self.logger = logger
    }

    /// The server whose threads serve the kernel's connections.
    public func serve(with server: Server<EngineDevice>) {
        state.withLock { $0.server = server }
    }

    /// The device path while attached.
    public var device: String? { attachedDevice.withLock { $0 } }

    @discardableResult
    public func enable() throws -> String {
        try state.withLock { state in
            if let device = attachedDevice.withLock({ $0 }) { return device }
            guard !state.stopping else { throw EngineError("the engine is stopping") }
            guard let server = state.server else { throw EngineError("the engine is not serving yet") }
            // Before the device exists: an engine that cannot keep its links must not attach.
            if state.watcher == nil { state.watcher = try watchDeadLinks() }
            let frontend = try KernelFrontend(volume: settings.volume, size: settings.size,
                                              connections: settings.connections, ioTimeout: settings.ioTimeout,
                                              deadConnectionTimeout: settings.deadConnectionTimeout, device: settings.device,
                                              logger: logger)
            server.adopt(frontend.adopted)
            let device = try frontend.attach()
            state.frontend = frontend
            attachedDevice.withLock { $0 = device }
            return device
        }
    }

    /// Drains, detaches and stops watching for dead links: the engine is stopping.
    public func shutdown() {
        let watcher = state.withLock { state in
            state.stopping = true
            drainAndDetach(&state)
            return state.watcher.take()
        }
        watching.store(false, ordering: .releasing)
        watcher?.join()  // outside the lock, which the watcher may be waiting for
    }

    /// A request that outlives the I/O timeout (a replica stalls longer than
    /// that) makes the kernel mark its connection dead and say LINK_DEAD; with
    /// every connection dead the device would fail I/O after the dead-connection
    /// timeout although the engine is alive. So each dead link gets a new one.
    private func watchDeadLinks() throws -> PosixThread {
        let events = try KernelNBD.DeadLinks()
        watching.store(true, ordering: .releasing)
        return try PosixThread(name: "keel-links") { [self] in
            while watching.load(ordering: .acquiring) {
                do {
                    let indexes = try events.next(waitingUpTo: 250)
                    if !indexes.isEmpty { replaceDeadLinks(of: Set(indexes)) }
                } catch NetlinkError.kernel(let errno, _) where errno == ENOBUFS {
                    logger.warning("the kernel's dead-link notifications overflowed; checking the connections")
                    replaceDeadLinks(of: nil)
                } catch {
                    logger.error("cannot read the kernel's dead-link notifications: \(error)")
                    usleep(250_000)
                }
            }
        }
    }

    /// `indexes`: the devices the kernel named (nil: it may have been any).
    private func replaceDeadLinks(of indexes: Set<UInt32>?) {
        state.withLock { state in
            guard !state.stopping, let frontend = state.frontend, let index = frontend.index,
                  indexes?.contains(index) ?? true, let server = state.server else { return }
            do {
                let replaced = try frontend.replaceDeadLinks(adopt: server.adopt)
                if replaced > 0 {
                    logger.warning("/dev/nbd\(index): the kernel gave up on \(replaced) connection(s) (a request outlived --io-timeout); gave it new ones")
                }
            } catch {
                logger.error("/dev/nbd\(index): cannot replace dead connections: \(error)")
            }
        }
    }

    /// Drains (bounded: the kernel's own I/O timeout) and detaches.
    public func disable() {
        state.withLock { drainAndDetach(&$0) }
    }

    private func drainAndDetach(_ state: inout State) {
        guard let frontend = state.frontend, let server = state.server else { return }
        var quiet = 0
        for _ in 0..<(Int(settings.ioTimeout) * 100) where quiet < 3 {
            quiet = server.adoptedRequestsInFlight == 0 ? quiet + 1 : 0
            usleep(10_000)
        }
        if quiet < 3 { logger.warning("detaching with requests still in flight after \(settings.ioTimeout) s") }
        frontend.detach()
        state.frontend = nil
        attachedDevice.withLock { $0 = nil }
    }
}
