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
    /// Duplicates of the engine's ends: after RECONFIGURE they tell whether the kernel kept the sockets.
    private var probes: [Int32]
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
        let negotiated = Negotiated(export: export, structuredReplies: false, baseAllocation: false)
        var engineEnds: [AdoptedConnection] = []
        var kernelEnds: [Int32] = []
        for _ in 0..<connections {
            var pair: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
                let error = SystemError.current("socketpair")
                for fd in kernelEnds + engineEnds.map(\.fd.rawValue) { close(fd) }
                throw error
            }
            engineEnds.append(AdoptedConnection(fd: FileDescriptor(rawValue: pair[0]), negotiated: negotiated))
            kernelEnds.append(pair[1])
        }
        self.kernelEnds = kernelEnds
        adopted = engineEnds
        probes = engineEnds.map { dup($0.fd.rawValue) }
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
            closeProbes()
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
    private func closeProbes() {
        for fd in probes { close(fd) }
        probes = []
    }

    private func checkSocketsWereTaken(_ index: UInt32) throws {
        defer { closeProbes() }
        var polls = probes.map { pollfd(fd: $0, events: 0, revents: 0) }
        _ = poll(&polls, nfds_t(polls.count), 100)
        let dropped = polls.filter { $0.revents & Int16(POLLHUP) != 0 }.count
        guard dropped == 0 else {
            throw EngineError("""
                /dev/nbd\(index) kept only \(polls.count - dropped) of \(polls.count) new connections: \
                another engine is still serving \(backendIdentifier)
                """)
        }
    }

    /// DISCONNECT: the kernel ends its connections; the device stays, empty.
    public func detach() {
        guard let index else { return }
        do {
            try kernel.disconnect(index: index)
            logger.notice("detached /dev/nbd\(index)")
        } catch {
            logger.error("cannot detach /dev/nbd\(index): \(error)")
        }
        self.index = nil
    }
}
