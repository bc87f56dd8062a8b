import KernelNBD
import Logging
import NBDProtocol
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// `/dev/nbdX` made of connections to an engine: CONNECT (or, when a device
/// already carries the volume's backend identifier, RECONFIGURE into its dead
/// slots), dead links replaced, DISCONNECT after the I/O in flight drained.
/// It keeps a duplicate of every socket it gave the kernel (a probe): the
/// kernel shuts a socket down when it declares it dead, which the probe shows
/// as a hang-up, and shutting a probe down is how a live link is retired.
/// A device taken over from a frontend that died has slots without probes:
/// those are known dead only by the kernel's LINK_DEAD reports.
public final class KernelDevice {
    public struct Settings: Sendable {
        public var volume: String
        public var connections: Int
        /// Seconds a request may take before the kernel declares its connection dead and retries it on another.
        public var ioTimeout: UInt64
        /// Seconds the device holds I/O while none of its connections is alive.
        public var deadConnectionTimeout: UInt64
        /// The device to attach (`/dev/nbd<index>`); nil lets the kernel pick one.
        public var device: UInt32?

        public init(volume: String, connections: Int, ioTimeout: UInt64, deadConnectionTimeout: UInt64, device: UInt32? = nil) {
            self.volume = volume
            self.connections = connections
            self.ioTimeout = ioTimeout
            self.deadConnectionTimeout = deadConnectionTimeout
            self.device = device
        }

        public var backendIdentifier: String { "keel:\(volume)" }
    }

    public let settings: Settings
    private let kernel: KernelNBD
    private let logger: Logger
    private var probes: [FileDescriptor] = []
    /// Slots whose sockets another frontend made (a take-over), and how many of them the kernel reported dead.
    private var unprobedSlots = 0
    private var unprobedDead = 0
    public private(set) var size: UInt64?
    public private(set) var index: UInt32?

    /// Throws `KernelNBD.Failure.moduleMissing` (with how to load it) when the kernel has no NBD driver.
    public init(settings: Settings, logger: Logger) throws {
        precondition((1...16).contains(settings.connections), "1 to 16 connections")
        kernel = try KernelNBD()
        self.settings = settings
        self.logger = logger
    }

    deinit { for probe in probes { probe.close() } }

    public var path: String? { index.map { "/dev/nbd\($0)" } }

    /// Attaches the links as the volume's device and returns its path. A
    /// device that already carries the backend identifier (its frontend or
    /// engine died; the kernel holds its I/O) is taken over: RECONFIGURE
    /// fills its dead slots. The kernel holds its own references to the
    /// sockets; the ones kept here are the probes.
    public func attach(_ links: [EngineLink]) throws -> String {
        precondition(index == nil && links.count == settings.connections, "attach once, with every connection")
        let first = links[0]
        guard links.allSatisfy({ $0.size == first.size && $0.flags == first.flags }) else {
            links.forEach { $0.fd.close() }
            throw SystemError(errno: EPROTO, "the engine's connections disagree about the volume's size or flags")
        }
        var configuration = KernelNBD.Configuration(size: first.size, serverFlags: UInt64(first.flags.rawValue),
                                                    backendIdentifier: settings.backendIdentifier)
        configuration.timeout = settings.ioTimeout
        configuration.deadConnectionTimeout = settings.deadConnectionTimeout
        configuration.index = settings.device
        let sockets = links.map(\.fd.rawValue)
        defer { links.forEach { $0.fd.close() } }
        let index: UInt32
        if let existing = try kernel.status().first(where: {
            $0.connected && KernelNBD.backendIdentifier(of: $0.index) == settings.backendIdentifier
        }) {
            // The kernel fills the dead slots and drops the sockets it finds
            // none for (their copies close here, so the engine sees them end);
            // which ones it kept cannot be told, so no slot gets a probe.
            index = existing.index
            try kernel.reconfigure(index: index, sockets: sockets, configuration: configuration)
            unprobedSlots = links.count
            logger.notice("took over /dev/nbd\(index) (backend \(settings.backendIdentifier)): its dead connections got new ones, the live ones stay")
        } else {
            index = try kernel.connect(sockets: sockets, configuration: configuration)
            probes = try sockets.map { try duplicate($0) }
            let tls = links.allSatisfy(\.encrypted) ? ", TLS held by the kernel (kTLS)" : ""
            logger.notice("attached /dev/nbd\(index) with \(links.count) connection(s)\(tls), backend \(settings.backendIdentifier)")
        }
        size = first.size
        self.index = index
        return "/dev/nbd\(index)"
    }

    /// How many of the device's connections the kernel has given up on (or
    /// that were retired), after waiting up to `milliseconds` for the first.
    public func deadLinks(waitingUpTo milliseconds: Int32 = 0) -> Int {
        hungUp(waitingUpTo: milliseconds).count + unprobedDead
    }

    /// The kernel reported `count` dead links of this device and no probe
    /// shows one: they were slots without probes.
    public func noteDeadLinkReports(_ count: Int) {
        guard count > 0, unprobedSlots > unprobedDead, hungUp(waitingUpTo: 100).isEmpty else { return }
        unprobedDead = min(unprobedSlots, unprobedDead + count)
    }

    /// Puts `links` into the device's dead slots: the dead probes go, the new
    /// ones come. Returns how many the kernel took.
    public func replaceDeadLinks(with links: [EngineLink]) throws -> Int {
        guard let index, let size else { links.forEach { $0.fd.close() }; return 0 }
        defer { links.forEach { $0.fd.close() } }
        if let wrong = links.first(where: { $0.size != size }) {
            throw SystemError(errno: EPROTO, "the engine serves \(wrong.size) bytes; /dev/nbd\(index) has \(size)")
        }
        let dead = hungUp(waitingUpTo: 0)
        for slot in dead.reversed() { probes.remove(at: slot).close() }
        let taken = Array(links.prefix(dead.count + unprobedDead))
        guard !taken.isEmpty else { return 0 }
        var configuration = KernelNBD.Configuration(size: size, serverFlags: UInt64(taken[0].flags.rawValue),
                                                    backendIdentifier: settings.backendIdentifier)
        configuration.timeout = settings.ioTimeout
        configuration.deadConnectionTimeout = settings.deadConnectionTimeout
        try kernel.reconfigure(index: index, sockets: taken.map(\.fd.rawValue), configuration: configuration)
        let filledUnprobed = taken.count - dead.count
        unprobedSlots -= filledUnprobed
        unprobedDead -= filledUnprobed
        for link in taken { probes.append(try duplicate(link.fd.rawValue)) }
        return taken.count
    }

    /// Shuts every live connection down: the kernel declares them dead and
    /// holds new I/O until `replaceDeadLinks` gives it others. How a device
    /// leaves an engine that is gone or fenced.
    public func retireLinks() {
        for probe in probes { Socket.shutdown(probe) }
    }

    /// Waits (at most the I/O timeout) for the kernel's requests in flight to
    /// be answered, then DISCONNECT: the device stays, empty.
    public func detach() {
        guard let index else { return }
        var quiet = 0
        for _ in 0..<(Int(settings.ioTimeout) * 100) where quiet < 3 {
            quiet = requestsInFlight(index) == 0 ? quiet + 1 : 0
            usleep(10_000)
        }
        if quiet < 3 { logger.warning("detaching /dev/nbd\(index) with requests still in flight after \(settings.ioTimeout) s") }
        do {
            try kernel.disconnect(index: index)
            logger.notice("detached /dev/nbd\(index)")
        } catch {
            logger.error("cannot detach /dev/nbd\(index): \(error)")
        }
        for probe in probes { probe.close() }
        probes = []
        unprobedSlots = 0
        unprobedDead = 0
        self.index = nil
    }

    /// Reads and writes the block layer has queued or sent and not completed.
    public var requestsInFlight: Int { index.map(requestsInFlight) ?? 0 }

    private func requestsInFlight(_ index: UInt32) -> Int {
        guard let text = readSmallFile("/sys/block/nbd\(index)/inflight", limit: 64) else { return 0 }
        return text.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { Int($0) }.reduce(0, +)
    }

    private func hungUp(waitingUpTo milliseconds: Int32) -> [Int] {
        var polls = probes.map { pollfd(fd: $0.rawValue, events: 0, revents: 0) }
        _ = poll(&polls, nfds_t(polls.count), milliseconds)
        return polls.indices.filter { polls[$0].revents & Int16(POLLHUP | POLLERR) != 0 }
    }

    private func duplicate(_ fd: Int32) throws -> FileDescriptor {
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { throw SystemError.current("dup") }
        return FileDescriptor(rawValue: copy)
    }
}
