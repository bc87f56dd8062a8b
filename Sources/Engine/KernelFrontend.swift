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
    private let configuration: KernelNBD.Configuration
    private let kernel: KernelNBD
    private let logger: Logger
    public private(set) var index: UInt32?

    /// Checks that the kernel has the NBD driver before anything else happens.
    public init(volume: String, size: UInt64, connections: Int, logger: Logger) throws {
        kernel = try KernelNBD()
        self.connections = connections
        self.logger = logger
        backendIdentifier = "keel:\(volume)"
        let export = ExportDescription(name: volume, size: size, readOnly: false)
        // The kernel speaks simple replies only and never asks for block status.
        let negotiated = Negotiated(export: export, structuredReplies: false, baseAllocation: false)
        var engineEnds: [AdoptedConnection] = []
        kernelEnds = []
        for _ in 0..<connections {
            var pair: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
                throw SystemError.current("socketpair")
            }
            engineEnds.append(AdoptedConnection(fd: FileDescriptor(rawValue: pair[0]), negotiated: negotiated))
            kernelEnds.append(pair[1])
        }
        adopted = engineEnds
        configuration = KernelNBD.Configuration(size: size, serverFlags: UInt64(negotiated.transmissionFlags.rawValue),
                                                backendIdentifier: backendIdentifier)
    }

    deinit { for fd in kernelEnds { close(fd) } }

    /// CONNECT; returns the device path. The kernel holds its own references
    /// to the sockets, so this process's copies of its ends are closed.
    public func attach() throws -> String {
        let index = try kernel.connect(sockets: kernelEnds, configuration: configuration)
        self.index = index
        for fd in kernelEnds { close(fd) }
        kernelEnds = []
        logger.notice("attached as /dev/nbd\(index) with \(connections) connection(s), backend \(backendIdentifier)")
        return "/dev/nbd\(index)"
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
