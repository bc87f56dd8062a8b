import CNetlink
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A blocking generic netlink socket: one request at a time, each answered
/// (and acknowledged) before the next.
final class GenericNetlinkSocket {
    private let fd: Int32
    private var sequence: UInt32 = 1

    init() throws {
        fd = try openNetlinkSocket(NETLINK_GENERIC)
    }

    deinit { close(fd) }

    /// Also receive the multicast group's notifications.
    func join(group: UInt32) throws {
        var id = group
        guard setsockopt(fd, 270 /* SOL_NETLINK */, 1 /* NETLINK_ADD_MEMBERSHIP */, &id,
                         socklen_t(MemoryLayout<UInt32>.size)) == 0 else {
            throw SystemError.current("join netlink group \(group)")
        }
    }

    /// Notifications that arrive within `milliseconds` (empty when none did).
    func notifications(waitingUpTo milliseconds: Int32) throws -> [NetlinkReply] {
        var ready = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&ready, 1, milliseconds) > 0 else { return [] }
        var buffer = [UInt8](repeating: 0, count: 65536)
        let received = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        if received < 0 && errno == ENOBUFS { throw NetlinkError.kernel(errno: ENOBUFS, "notifications were lost") }
        guard received > 0 else { return [] }
        return try NetlinkReply.parse(Array(buffer.prefix(received)))
    }

    /// The family id and multicast groups of a generic netlink family.
    func family(named name: String) throws -> (id: UInt16, groups: [String: UInt32]) {
        let replies: [NetlinkReply]
        do {
            replies = try request(family: UInt16(GENL_ID_CTRL), command: UInt8(CTRL_CMD_GETFAMILY), version: 1,
                                  [.string(UInt16(CTRL_ATTR_FAMILY_NAME), name)])
        } catch NetlinkError.kernel(let errno, _) where errno == ENOENT {
            throw NetlinkError.noFamily(name)
        }
        for case .message(_, _, _, let attributes) in replies {
            guard let id = attributes.first(UInt16(CTRL_ATTR_FAMILY_ID))?.u16 else { continue }
            var groups: [String: UInt32] = [:]
            for group in attributes.first(UInt16(CTRL_ATTR_MCAST_GROUPS))?.children ?? [] {
                let fields = group.children
                if let name = fields.first(UInt16(CTRL_ATTR_MCAST_GRP_NAME))?.string,
                   let groupID = fields.first(UInt16(CTRL_ATTR_MCAST_GRP_ID))?.u32 {
                    groups[name] = groupID
                }
            }
            return (id, groups)
        }
        throw NetlinkError.noFamily(name)
    }

    /// Sends one request with NLM_F_REQUEST|NLM_F_ACK and returns the data
    /// messages that came back before the acknowledgement.
    func request(family: UInt16, command: UInt8, version: UInt8, _ attributes: [NetlinkAttribute]) throws -> [NetlinkReply] {
        sequence &+= 1
        let message = NetlinkMessage(family: family, flags: UInt16(NLM_F_REQUEST | NLM_F_ACK), sequence: sequence,
                                     command: command, version: version, attributes: attributes)
        let bytes = message.bytes
        let sent = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        guard sent == bytes.count else { throw SystemError.current("send(netlink)") }
        var collected: [NetlinkReply] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        for _ in 0..<64 {
            let received = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard received > 0 else { throw SystemError.current("recv(netlink)") }
            for reply in try NetlinkReply.parse(Array(buffer.prefix(received))) {
                switch reply {
                case .status(let seq, let error) where seq == sequence:
                    if error != 0 {
                        throw NetlinkError.kernel(errno: -error, String(cString: strerror(-error)))
                    }
                    return collected
                case .done(let seq) where seq == sequence:
                    return collected
                case .message(_, let seq, _, _) where seq == sequence:
                    collected.append(reply)
                default:
                    continue
                }
            }
        }
        throw NetlinkError.malformed("no acknowledgement")
    }
}

/// A bound netlink socket of `family` (NETLINK_GENERIC, NETLINK_KOBJECT_UEVENT…),
/// joined to the multicast `groups` (a bit mask) from the start.
func openNetlinkSocket(_ family: Int32, groups: UInt32 = 0) throws -> Int32 {
    let fd = socket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), family)
    guard fd >= 0 else { throw SystemError.current("socket(AF_NETLINK, \(family))") }
    var address = sockaddr_nl()
    address.nl_family = sa_family_t(AF_NETLINK)
    address.nl_groups = groups
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_nl>.size)) }
    }
    guard bound == 0 else {
        let error = SystemError.current("bind(AF_NETLINK, \(family))")
        close(fd)
        throw error
    }
    return fd
}
