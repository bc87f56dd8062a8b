/// The 64-bit user data of every ring operation: what kind of operation it
/// is and whom its completion belongs to, so completions need no lookup
/// table and no allocation.
///
/// bits 56...63 kind, 48...55 device sub-operation, 24...47 connection, 0...23 slot.
public struct IOToken: Equatable {
    public enum Kind: UInt8 {
        case accept = 1
        case receive = 2
        case send = 3
        case device = 4
        case wake = 5
        case cancel = 6
        case graceTimer = 7
        /// The device worker's own operations, not tied to a request (polls, timers).
        case worker = 8
    }

    public let rawValue: UInt64

    public init(rawValue: UInt64) { self.rawValue = rawValue }

    init(_ kind: Kind, connection: Int = 0, slot: Int = 0) {
        rawValue = UInt64(kind.rawValue) << 56 | UInt64(connection & 0xFF_FFFF) << 24 | UInt64(slot & 0xFF_FFFF)
    }

    var kind: Kind? { Kind(rawValue: UInt8(truncatingIfNeeded: rawValue >> 56)) }
    var connection: Int { Int(truncatingIfNeeded: rawValue >> 24) & 0xFF_FFFF }
    var slot: Int { Int(truncatingIfNeeded: rawValue) & 0xFF_FFFF }

    /// A token for the worker's own operations; `index` is the worker's to choose.
    public static func worker(_ index: Int, sub: UInt8 = 0) -> IOToken {
        IOToken(.worker, connection: 0, slot: index).with(sub: sub)
    }

    /// The worker's index in a `.worker` token.
    public var workerIndex: Int { slot }

    /// The device's own number for one of several operations of a request.
    public var sub: UInt8 { UInt8(truncatingIfNeeded: rawValue >> 48) }

    public func with(sub: UInt8) -> IOToken {
        IOToken(rawValue: rawValue & ~(0xFF << 48) | UInt64(sub) << 48)
    }
}
