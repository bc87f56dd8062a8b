/// Generic netlink messages as bytes: a `nlmsghdr`, a `genlmsghdr`, then
/// attributes (`nlattr`: 16-bit length, 16-bit type, payload, padded to 4).
/// Host byte order throughout, as netlink is.
public struct NetlinkMessage: Equatable {
    public var family: UInt16
    public var flags: UInt16
    public var sequence: UInt32
    public var command: UInt8
    public var version: UInt8
    public var attributes: [NetlinkAttribute]

    public init(family: UInt16, flags: UInt16, sequence: UInt32, command: UInt8, version: UInt8,
                attributes: [NetlinkAttribute]) {
        self.family = family
        self.flags = flags
        self.sequence = sequence
        self.command = command
        self.version = version
        self.attributes = attributes
    }

    static let headerSize = 16
    static let genericHeaderSize = 4

    public var bytes: [UInt8] {
        var body: [UInt8] = [command, version, 0, 0]
        for attribute in attributes { attribute.append(to: &body) }
        var out: [UInt8] = []
        out.appendHost(UInt32(Self.headerSize + body.count))
        out.appendHost(family)
        out.appendHost(flags)
        out.appendHost(sequence)
        out.appendHost(UInt32(0))  // port id: the kernel fills it in
        return out + body
    }
}

/// One attribute: a scalar, a string, or nested attributes.
public struct NetlinkAttribute: Equatable {
    public var type: UInt16
    public var payload: [UInt8]

    public init(type: UInt16, payload: [UInt8]) {
        self.type = type
        self.payload = payload
    }

    public static func u8(_ type: UInt16, _ value: UInt8) -> Self { Self(type: type, payload: [value]) }
    public static func u16(_ type: UInt16, _ value: UInt16) -> Self { Self(type: type, payload: .host(value)) }
    public static func u32(_ type: UInt16, _ value: UInt32) -> Self { Self(type: type, payload: .host(value)) }
    public static func u64(_ type: UInt16, _ value: UInt64) -> Self { Self(type: type, payload: .host(value)) }
    /// NUL-terminated, as NLA_STRING / NLA_NUL_STRING expect.
    public static func string(_ type: UInt16, _ value: String) -> Self { Self(type: type, payload: Array(value.utf8) + [0]) }
    public static func nested(_ type: UInt16, _ children: [NetlinkAttribute]) -> Self {
        var payload: [UInt8] = []
        for child in children { child.append(to: &payload) }
        return Self(type: type, payload: payload)
    }

    func append(to out: inout [UInt8]) {
        out.appendHost(UInt16(4 + payload.count))
        out.appendHost(type)
        out += payload
        while out.count % 4 != 0 { out.append(0) }
    }

    public var u8: UInt8? { payload.count >= 1 ? payload[0] : nil }
    public var u16: UInt16? { payload.loadHost() }
    public var u32: UInt32? { payload.loadHost() }
    public var u64: UInt64? { payload.loadHost() }
    public var string: String? {
        String(decoding: payload.prefix { $0 != 0 }, as: UTF8.self)
    }
    public var children: [NetlinkAttribute] { (try? Self.parse(payload[...])) ?? [] }

    /// The attributes in `bytes`; throws on a length that does not fit.
    static func parse(_ bytes: ArraySlice<UInt8>) throws -> [NetlinkAttribute] {
        var attributes: [NetlinkAttribute] = []
        var at = bytes.startIndex
        while bytes.endIndex - at >= 4 {
            let length = Int(UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8)
            let type = (UInt16(bytes[at + 2]) | UInt16(bytes[at + 3]) << 8) & 0x3FFF  // without NESTED/BYTEORDER bits
            guard length >= 4, at + length <= bytes.endIndex else { throw NetlinkError.malformed("attribute length \(length)") }
            attributes.append(NetlinkAttribute(type: type, payload: Array(bytes[(at + 4)..<(at + length)])))
            at += (length + 3) & ~3
        }
        return attributes
    }
}

extension [NetlinkAttribute] {
    public func first(_ type: UInt16) -> NetlinkAttribute? { first { $0.type == type } }
}

/// A message the kernel sent: either generic netlink data or an error/ack.
enum NetlinkReply {
    case message(type: UInt16, sequence: UInt32, command: UInt8, attributes: [NetlinkAttribute])
    /// NLMSG_ERROR: 0 is an acknowledgement, otherwise a negative errno.
    case status(sequence: UInt32, error: Int32)
    case done(sequence: UInt32)

    /// Every message in one datagram.
    static func parse(_ datagram: [UInt8]) throws -> [NetlinkReply] {
        var replies: [NetlinkReply] = []
        var at = 0
        while datagram.count - at >= NetlinkMessage.headerSize {
            let slice = datagram[at...]
            guard let length: UInt32 = Array(slice.prefix(4)).loadHost(),
                  let type: UInt16 = Array(slice.dropFirst(4).prefix(2)).loadHost(),
                  let sequence: UInt32 = Array(slice.dropFirst(8).prefix(4)).loadHost(),
                  length >= 16, at + Int(length) <= datagram.count else {
                throw NetlinkError.malformed("message header at \(at)")
            }
            let body = datagram[(at + 16)..<(at + Int(length))]
            switch type {
            case 2:  // NLMSG_ERROR
                guard let error: Int32 = Array(body.prefix(4)).loadHost() else { throw NetlinkError.malformed("error message") }
                replies.append(.status(sequence: sequence, error: error))
            case 3:  // NLMSG_DONE
                replies.append(.done(sequence: sequence))
            default:
                guard body.count >= 4 else { throw NetlinkError.malformed("generic header") }
                replies.append(.message(type: type, sequence: sequence, command: body[body.startIndex],
                                        attributes: try NetlinkAttribute.parse(body.dropFirst(4))))
            }
            at += (Int(length) + 3) & ~3
        }
        return replies
    }
}

public enum NetlinkError: Error, CustomStringConvertible, Equatable {
    case malformed(String)
    case kernel(errno: Int32, String)
    case noFamily(String)

    public var description: String {
        switch self {
        case .malformed(let what): return "malformed netlink reply (\(what))"
        case .kernel(_, let message): return message
        case .noFamily(let name): return "the kernel has no generic netlink family '\(name)'"
        }
    }
}

extension [UInt8] {
    static func host<T: FixedWidthInteger>(_ value: T) -> [UInt8] { Swift.withUnsafeBytes(of: value) { Array($0) } }

    mutating func appendHost<T: FixedWidthInteger>(_ value: T) { self += .host(value) }

    func loadHost<T: FixedWidthInteger>() -> T? {
        guard count >= MemoryLayout<T>.size else { return nil }
        return withUnsafeBytes { $0.loadUnaligned(as: T.self) }
    }
}
