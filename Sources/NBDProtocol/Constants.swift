/// Numbers from the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md).
public enum NBDMagic {
    public static let initPassword: UInt64 = 0x4e42_444d_4147_4943   // "NBDMAGIC"
    public static let option: UInt64 = 0x4948_4156_454F_5054         // "IHAVEOPT"
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    public static let request: UInt32 = 0x2560_9513
    public static let simpleReply: UInt32 = 0x6744_6698
    public static let structuredReply: UInt32 = 0x668e_33ef
}

public struct HandshakeFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fixedNewstyle = HandshakeFlags(rawValue: 1 << 0)
    public static let noZeroes = HandshakeFlags(rawValue: 1 << 1)
}

public struct ClientFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let fixedNewstyle = ClientFlags(rawValue: 1 << 0)
    public static let noZeroes = ClientFlags(rawValue: 1 << 1)
}

public struct TransmissionFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = TransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
    public static let rotational = TransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = TransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = TransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = TransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = TransmissionFlags(rawValue: 1 << 11)
}

public enum OptionType: UInt32, Sendable {
    case exportName = 1
    case abort = 2
    case list = 3
    case startTLS = 5
    case info = 6
    case go = 7
    case structuredReply = 8
    case listMetaContext = 9
    case setMetaContext = 10
}

public enum OptionReplyType: UInt32, Sendable {
    case ack = 1
    case server = 2
    case info = 3
    case metaContext = 4
    case errUnsupported = 0x8000_0001
    case errPolicy = 0x8000_0002
    case errInvalid = 0x8000_0003
    case errPlatform = 0x8000_0004
    case errTLSRequired = 0x8000_0005
    case errUnknown = 0x8000_0006
    case errShutdown = 0x8000_0007
    case errBlockSizeRequired = 0x8000_0008
    case errTooBig = 0x8000_0009
}

public enum InfoType: UInt16, Sendable {
    case export = 0
    case name = 1
    case description = 2
    case blockSize = 3
}

public enum CommandType: UInt16, Sendable {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7
}

public struct CommandFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = CommandFlags(rawValue: 1 << 0)
    public static let noHole = CommandFlags(rawValue: 1 << 1)
    public static let dontFragment = CommandFlags(rawValue: 1 << 2)
    public static let requestOne = CommandFlags(rawValue: 1 << 3)
    public static let fastZero = CommandFlags(rawValue: 1 << 4)
}

/// Error values carried in replies (fixed by the protocol, not the host's errno).
public enum NBDError: UInt32, Error, Sendable {
    case permission = 1       // EPERM
    case io = 5               // EIO
    case noMemory = 12        // ENOMEM
    case invalid = 22         // EINVAL
    case noSpace = 28         // ENOSPC
    case overflow = 75        // EOVERFLOW
    case notSupported = 95    // ENOTSUP
    case shutdown = 108       // ESHUTDOWN
}

public enum ReplyChunkType: UInt16, Sendable {
    case none = 0
    case offsetData = 1
    case offsetHole = 2
    case blockStatus = 5
    case error = 0x8001
    case errorOffset = 0x8002
}

public struct ReplyFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let done = ReplyFlags(rawValue: 1 << 0)
}

/// `base:allocation` block status flags.
public struct AllocationState: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let hole = AllocationState(rawValue: 1 << 0)
    public static let zero = AllocationState(rawValue: 1 << 1)
}

public enum MetaContext {
    public static let baseAllocation = "base:allocation"
    /// The id Keel gives `base:allocation` in replies.
    public static let baseAllocationID: UInt32 = 1
}
