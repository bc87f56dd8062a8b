import CNetlink
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// The kernel's NBD driver, driven over its generic netlink family `nbd`:
/// it takes sockets that are already in the transmission phase and makes
/// `/dev/nbdX` of them.
public final class KernelNBD {
    /// What CONNECT configures; the socket count is fixed for the device's life.
    public struct Configuration {
        public var size: UInt64
        public var blockSize: UInt64 = 4096
        /// Seconds a request may take before the kernel times it out (then it retries or fails it).
        public var timeout: UInt64 = 60
        /// Seconds the device holds I/O while no connection is alive (an engine restarting).
        public var deadConnectionTimeout: UInt64 = 120
        /// The NBD transmission flags the server would have sent.
        public var serverFlags: UInt64
        /// `keel:<volume>`: how a new engine finds its device again.
        public var backendIdentifier: String
        /// The device to attach (`/dev/nbd<index>`); nil lets the kernel pick a free one or make one.
        public var index: UInt32?

        public init(size: UInt64, serverFlags: UInt64, backendIdentifier: String) {
            self.size = size
            self.serverFlags = serverFlags
            self.backendIdentifier = backendIdentifier
        }
    }

    public struct Device: Equatable {
        public var index: UInt32
        public var connected: Bool
        public var path: String { "/dev/nbd\(index)" }
    }

    public enum Failure: Error, CustomStringConvertible {
        case moduleMissing
        case refused(String, NetlinkError)
        case deviceBusy(UInt32)

        public var description: String {
            switch self {
            case .moduleMissing:
                return "the kernel has no NBD driver loaded; load it with 'modprobe nbd' (package linux-modules-extra on some distributions)"
            case .deviceBusy(let index):
                return "/dev/nbd\(index) is in use by another NBD connection; name a free device, or none and the kernel picks one"
            case .refused(let what, let error):
                return "the kernel refused to \(what): \(error)"
            }
        }
    }

    private let socket: GenericNetlinkSocket
    private let family: UInt16
    private static let version: UInt8 = UInt8(NBD_GENL_VERSION)

    public init() throws {
        socket = try GenericNetlinkSocket()
        do {
            family = try socket.family(named: NBD_GENL_FAMILY_NAME).id
        } catch NetlinkError.noFamily {
            throw Failure.moduleMissing
        }
    }

    /// CONNECT: the kernel picks a free device (or makes one) and returns its index.
    public func connect(sockets: [Int32], configuration c: Configuration) throws -> UInt32 {
        let replies: [NetlinkReply]
        do {
            replies = try command(NBD_CMD_CONNECT, "attach a device", Self.connectAttributes(sockets: sockets, c))
        } catch Failure.refused(_, .kernel(let errno, _)) where errno == EBUSY && c.index != nil {
            throw Failure.deviceBusy(c.index!)
        }
        for case .message(_, _, _, let attributes) in replies {
            if let index = attributes.first(UInt16(NBD_ATTR_INDEX))?.u32 { return index }
        }
        throw Failure.refused("attach a device", .malformed("no device index in the answer"))
    }

    static func connectAttributes(sockets: [Int32], _ c: Configuration) -> [NetlinkAttribute] {
        (c.index.map { [.u32(UInt16(NBD_ATTR_INDEX), $0)] } ?? []) + [
            .u64(UInt16(NBD_ATTR_SIZE_BYTES), c.size),
            .u64(UInt16(NBD_ATTR_BLOCK_SIZE_BYTES), c.blockSize),
            .u64(UInt16(NBD_ATTR_TIMEOUT), c.timeout),
            .u64(UInt16(NBD_ATTR_SERVER_FLAGS), c.serverFlags),
            .u64(UInt16(NBD_ATTR_DEAD_CONN_TIMEOUT), c.deadConnectionTimeout),
            .string(UInt16(NBD_ATTR_BACKEND_IDENTIFIER), c.backendIdentifier),
            socketList(sockets),
        ]
    }

    /// RECONFIGURE: hands new sockets to a device whose connections are dead.
    /// The kernel fills dead slots only, and says nothing when there is none.
    public func reconfigure(index: UInt32, sockets: [Int32], configuration c: Configuration) throws {
        _ = try command(NBD_CMD_RECONFIGURE, "hand new connections to /dev/nbd\(index)", [
            .u32(UInt16(NBD_ATTR_INDEX), index),
            .u64(UInt16(NBD_ATTR_TIMEOUT), c.timeout),
            .u64(UInt16(NBD_ATTR_DEAD_CONN_TIMEOUT), c.deadConnectionTimeout),
            .string(UInt16(NBD_ATTR_BACKEND_IDENTIFIER), c.backendIdentifier),
            Self.socketList(sockets),
        ])
    }

    public func disconnect(index: UInt32) throws {
        _ = try command(NBD_CMD_DISCONNECT, "detach /dev/nbd\(index)", [.u32(UInt16(NBD_ATTR_INDEX), index)])
    }

    /// STATUS of one device, or of all when `index` is nil.
    public func status(index: UInt32? = nil) throws -> [Device] {
        let replies = try command(NBD_CMD_STATUS, "report device status",
                                  index.map { [.u32(UInt16(NBD_ATTR_INDEX), $0)] } ?? [])
        var devices: [Device] = []
        for case .message(_, _, _, let attributes) in replies {
            devices += Self.devices(in: attributes)
        }
        return devices
    }

    static func devices(in attributes: [NetlinkAttribute]) -> [Device] {
        (attributes.first(UInt16(NBD_ATTR_DEVICE_LIST))?.children ?? []).compactMap { item in
            let fields = item.children
            guard let index = fields.first(UInt16(NBD_DEVICE_INDEX))?.u32 else { return nil }
            return Device(index: index, connected: (fields.first(UInt16(NBD_DEVICE_CONNECTED))?.u8 ?? 0) != 0)
        }
    }

    /// The kernel's LINK_DEAD notifications: which devices lost a connection
    /// (a request timed out on it, or its socket failed).
    public final class DeadLinks {
        private let socket: GenericNetlinkSocket
        private let family: UInt16

        public init() throws {
            socket = try GenericNetlinkSocket()
            let found: (id: UInt16, groups: [String: UInt32])
            do { found = try socket.family(named: NBD_GENL_FAMILY_NAME) } catch NetlinkError.noFamily {
                throw Failure.moduleMissing
            }
            family = found.id
            guard let group = found.groups[NBD_GENL_MCAST_GROUP_NAME] else {
                throw Failure.refused("watch dead links", .malformed("no \(NBD_GENL_MCAST_GROUP_NAME) group"))
            }
            try socket.join(group: group)
        }

        /// Indexes of devices that reported a dead link within `milliseconds`;
        /// throws `NetlinkError.kernel(ENOBUFS)` when notifications were lost.
        public func next(waitingUpTo milliseconds: Int32) throws -> [UInt32] {
            try socket.notifications(waitingUpTo: milliseconds).compactMap { reply in
                guard case .message(let type, _, let command, let attributes) = reply, type == family,
                      command == UInt8(NBD_CMD_LINK_DEAD) else { return nil }
                return attributes.first(UInt16(NBD_ATTR_INDEX))?.u32
            }
        }
    }

    /// The backend identifier the kernel shows for a device (empty when none).
    public static func backendIdentifier(of index: UInt32) -> String {
        String(readSmallFile("/sys/block/nbd\(index)/backend", limit: 512)?.split(separator: "\n").first ?? "")
    }

    /// Devices whose backend identifier is `identifier` (sysfs shows it only while the device is configured).
    public static func devices(withBackend identifier: String) -> [UInt32] {
        guard let directory = opendir("/sys/block") else { return [] }
        defer { closedir(directory) }
        var found: [UInt32] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            guard name.hasPrefix("nbd"), let index = UInt32(name.dropFirst(3)) else { continue }
            if backendIdentifier(of: index) == identifier { found.append(index) }
        }
        return found.sorted()
    }

    private static func socketList(_ sockets: [Int32]) -> NetlinkAttribute {
        .nested(UInt16(NBD_ATTR_SOCKETS), sockets.map {
            .nested(UInt16(NBD_SOCK_ITEM), [.u32(UInt16(NBD_SOCK_FD), UInt32(bitPattern: $0))])
        })
    }

    private func command(_ command: Int, _ what: String, _ attributes: [NetlinkAttribute]) throws -> [NetlinkReply] {
        do {
            return try socket.request(family: family, command: UInt8(command), version: Self.version, attributes)
        } catch let error as NetlinkError {
            throw Failure.refused(what, error)
        }
    }
}
