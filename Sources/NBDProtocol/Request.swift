/// One transmission-phase request header (28 bytes on the wire).
public struct RequestHeader: Equatable, Sendable {
    public static let size = 28

    public var flags: UInt16
    public var type: UInt16
    public var handle: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: UInt16, type: UInt16, handle: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.handle = handle
        self.offset = offset
        self.length = length
    }

    public init(type: CommandType, flags: CommandFlags = [], handle: UInt64, offset: UInt64, length: UInt32) {
        self.init(flags: flags.rawValue, type: type.rawValue, handle: handle, offset: offset, length: length)
    }

    public var command: CommandType? { CommandType(rawValue: type) }
    public var commandFlags: CommandFlags { CommandFlags(rawValue: flags) }

    /// Only WRITE carries a payload.
    public var payloadLength: UInt32 { type == CommandType.write.rawValue ? length : 0 }

    public var encoded: [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Self.size)
        bytes.appendBigEndian(NBDMagic.request)
        bytes.appendBigEndian(flags)
        bytes.appendBigEndian(type)
        bytes.appendBigEndian(handle)
        bytes.appendBigEndian(offset)
        bytes.appendBigEndian(length)
        return bytes
    }
}

/// Splits the transmission byte stream into request headers and write
/// payload pieces, without copying payloads. Input can arrive in any chunks.
public struct RequestParser {
    public enum Event {
        case header(RequestHeader)
        /// A piece of the current WRITE's payload; `isLast` ends it.
        case payload(UnsafeRawBufferPointer, isLast: Bool)
        /// The stream is out of sync: the connection must be closed.
        case badMagic(UInt32)
    }

    private var staging = (UInt64(0), UInt64(0), UInt64(0), UInt32(0))
    private var staged = 0
    private var payloadRemaining: UInt32 = 0

    public init() {}

    /// True while the parser is inside a WRITE payload.
    public var inPayload: Bool { payloadRemaining > 0 }

    /// The next event from `input`, consuming what it used; nil when more bytes are needed.
    @inlinable
    public mutating func next(from input: inout UnsafeRawBufferPointer) -> Event? {
        return _next(from: &input)
    }

    @usableFromInline
    mutating func _next(from input: inout UnsafeRawBufferPointer) -> Event? {
        if payloadRemaining > 0 {
            guard !input.isEmpty else { return nil }
            let take = min(Int(payloadRemaining), input.count)
            let piece = UnsafeRawBufferPointer(rebasing: input[..<take])
            input = UnsafeRawBufferPointer(rebasing: input[take...])
            payloadRemaining -= UInt32(take)
            return .payload(piece, isLast: payloadRemaining == 0)
        }
        if staged == 0 && input.count >= RequestHeader.size {
            let event = decode(UnsafeRawBufferPointer(rebasing: input[..<RequestHeader.size]))
            input = UnsafeRawBufferPointer(rebasing: input[RequestHeader.size...])
            return event
        }
        guard !input.isEmpty else { return nil }
        let take = min(RequestHeader.size - staged, input.count)
        let stagedBefore = staged
        withUnsafeMutableBytes(of: &staging) { raw in
            raw.baseAddress!.advanced(by: stagedBefore).copyMemory(from: input.baseAddress!, byteCount: take)
        }
        staged += take
        input = UnsafeRawBufferPointer(rebasing: input[take...])
        guard staged == RequestHeader.size else { return nil }
        staged = 0
        let stagingCopy = staging
        return withUnsafeBytes(of: stagingCopy) { decode(UnsafeRawBufferPointer(rebasing: $0[..<RequestHeader.size])) }
    }

    private mutating func decode(_ bytes: UnsafeRawBufferPointer) -> Event {
        let magic = bytes.loadBigEndian(at: 0, as: UInt32.self)
        guard magic == NBDMagic.request else { return .badMagic(magic) }
        let header = RequestHeader(
            flags: bytes.loadBigEndian(at: 4),
            type: bytes.loadBigEndian(at: 6),
            handle: bytes.loadBigEndian(at: 8),
            offset: bytes.loadBigEndian(at: 16),
            length: bytes.loadBigEndian(at: 24))
        payloadRemaining = header.payloadLength
        return .header(header)
    }
}
