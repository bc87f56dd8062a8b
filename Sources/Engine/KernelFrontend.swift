import KernelNBD
import Logging
import NBDProtocol
import NBDServer
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// The volume as `/dev/nbdX`: socketpairs whose one end the engine serves,
/// already in the transmission phase, and whose other end the kernel gets over
/// netlink. The connection count is fixed for the device's life.
public final class KernelFrontend {
    public let connections: Int
    public let backendIdentifier: String
    /// The engine's ends, for the server to adopt.
    public let adopted: [AdoptedConnection]
    private var kernelEnds: [Int32]
    /// Duplicates of the engine's ends, one per live connection: a hang-up on
    /// one says the kernel dropped or shut down its end (a dead link).
    private var probes: [Int32]
    private let negotiated: Negotiated
    private let configuration: KernelNBD.Configuration
    private let kernel: KernelNBD
    private let logger: Logger
    public private(set) var index: UInt32?

    /// Throws `KernelNBD.Failure.moduleMissing` (with how to load it) when the kernel has no NBD driver.
    public static func checkDriver() throws { _ = try KernelNBD() }

    /// Checks that the kernel has the NBD driver before anything else happens.
    public init(volume: String, size: UInt64, connections: Int, ioTimeout: UInt64 = 30,
                deadConnectionTimeout: UInt64 = 120, device: UInt32? = nil, logger: Logger) throws {
        kernel = try KernelNBD()
        self.connections = connections
        self.logger = logger
        backendIdentifier = "keel:\(volume)"
        let export = ExportDescription(name: volume, size: size, readOnly: false)
        // The kernel speaks simple replies only and never asks for block status.
        negotiated = Negotiated(export: export, structuredReplies: false, baseAllocation: false)
        let pairs = try Self.makeSocketPairs(connections, negotiated: negotiated)
        kernelEnds = pairs.kernel
        adopted = pairs.engine
        probes = pairs.probes
        var configuration = KernelNBD.Configuration(size: size, serverFlags: UInt64(negotiated.transmissionFlags.rawValue),
                                                    backendIdentifier: backendIdentifier)
        configuration.timeout = ioTimeout
        configuration.deadConnectionTimeout = deadConnectionTimeout
        configuration.index = device
        self.configuration = configuration
    }

    deinit { for fd in kernelEnds + probes { close(fd) } }

    /// Attaches the volume and returns the device path. A device that already
    /// carries this volume's backend identifier (its engine died; the kernel
    /// holds its I/O for the dead-connection timeout) gets the new sockets
    /// with RECONFIGURE; otherwise CONNECT makes a new one. The kernel holds
    /// its own references to the sockets, so this process's copies are closed.
    public func attach() throws -> String {
        let index: UInt32
        if let existing = try kernel.status().first(where: {
            $0.connected && KernelNBD.backendIdentifier(of: $0.index) == backendIdentifier
        }) {
            index = existing.index
            try kernel.reconfigure(index: index, sockets: kernelEnds, configuration: configuration)
            closeKernelEnds()
            try checkSocketsWereTaken(index)
            logger.notice("took over /dev/nbd\(index) with \(connections) new connection(s), backend \(backendIdentifier)")
        } else {
            index = try kernel.connect(sockets: kernelEnds, configuration: configuration)
            closeKernelEnds()
            logger.notice("attached as /dev/nbd\(index) with \(connections) connection(s), backend \(backendIdentifier)")
        }
        self.index = index
        return "/dev/nbd\(index)"
    }

    private func closeKernelEnds() {
        for fd in kernelEnds { close(fd) }
        kernelEnds = []
    }

    /// RECONFIGURE fills dead connection slots only and silently drops a
    /// socket that finds none: then the socket is closed at once, which its
    /// other end shows as a hang-up.
    private func checkSocketsWereTaken(_ index: UInt32) throws {
        let dropped = hungUp(probes, waitingUpTo: 100)
        guard dropped.isEmpty else {
            closeProbes()
            throw EngineError("""
                /dev/nbd\(index) kept only \(probes.count - dropped.count) of \(probes.count) new connections: \
                another engine is still serving \(backendIdentifier)
                """)
        }
    }

    private func closeProbes() {
        for fd in probes { close(fd) }
        probes = []
    }

    /// Hands the kernel a new connection for each of the device's dead ones
    /// (the kernel said LINK_DEAD: a request timed out on it, or it failed);
    /// `adopt` gives the engine's ends to the server first. Returns how many
    /// the kernel took.
    public func replaceDeadLinks(adopt: ([AdoptedConnection]) -> Void) throws -> Int {
        guard let index else { return 0 }
        // The kernel shuts a dead link's socket down right after it announces it.
        var dead: [Int] = []
        for _ in 0..<10 where dead.isEmpty { dead = hungUp(probes, waitingUpTo: 100) }
        guard !dead.isEmpty else { return 0 }
        for slot in dead.reversed() { close(probes.remove(at: slot)) }
        let pairs = try Self.makeSocketPairs(dead.count, negotiated: negotiated)
        adopt(pairs.engine)
        defer { for fd in pairs.kernel { close(fd) } }
        do { try kernel.reconfigure(index: index, sockets: pairs.kernel, configuration: configuration) } catch {
            for fd in pairs.probes { close(fd) }
            throw error
        }
        let dropped = Set(hungUp(pairs.probes, waitingUpTo: 100))
        for (slot, fd) in pairs.probes.enumerated() {
            if dropped.contains(slot) { close(fd) } else { probes.append(fd) }
        }
        return pairs.probes.count - dropped.count
    }

    /// Which of `sockets` show a hang-up within `milliseconds`.
    private func hungUp(_ sockets: [Int32], waitingUpTo milliseconds: Int32) -> [Int] {
        var polls = sockets.map { pollfd(fd: $0, events: 0, revents: 0) }
        _ = poll(&polls, nfds_t(polls.count), milliseconds)
        return polls.indices.filter { polls[$0].revents & Int16(POLLHUP | POLLERR) != 0 }
    }

    /// `count` socketpairs: the engine's ends to adopt, the kernel's ends, and probes of the engine's ends.
    private static func makeSocketPairs(_ count: Int, negotiated: Negotiated)
        throws -> (engine: [AdoptedConnection], kernel: [Int32], probes: [Int32]) {
        var engine: [AdoptedConnection] = []
        var kernel: [Int32] = []
        for _ in 0..<count {
            var pair: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
                let error = SystemError.current("socketpair")
                for fd in kernel + engine.map(\.fd.rawValue) { close(fd) }
                throw error
            }
            engine.append(AdoptedConnection(fd: FileDescriptor(rawValue: pair[0]), negotiated: negotiated))
            kernel.append(pair[1])
        }
        return (engine, kernel, engine.map { dup($0.fd.rawValue) })
    }

    /// DISCONNECT: the kernel ends its connections; the device stays, empty.
    public func detach() {
        guard let index else { return }
        do {
            try kernel.disconnect(index: index)
            logger.notice("detached /dev/nbd\(index)")
            closeProbes()
        } catch {
            logger.error("cannot detach /dev/nbd\(index): \(error)")
        }
        self.index = nil
    }
}
