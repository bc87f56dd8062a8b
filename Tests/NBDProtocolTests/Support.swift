import NBDProtocol
import Testing

// Small shared helpers: big-endian byte builders, client-side message
// builders, a server-reply decoder, and drivers for Handshake and RequestParser.

func u16(_ value: UInt16) -> [UInt8] { var b: [UInt8] = []; b.appendBigEndian(value); return b }
func u32(_ value: UInt32) -> [UInt8] { var b: [UInt8] = []; b.appendBigEndian(value); return b }
func u64(_ value: UInt64) -> [UInt8] { var b: [UInt8] = []; b.appendBigEndian(value); return b }

enum Fixtures {
    static let disk = ExportDescription(name: "disk", description: "main disk", size: 1 << 30, readOnly: false)
    static let iso = ExportDescription(name: "iso", size: 10 * 4096 + 7, readOnly: true)
    /// `disk` is the default export.
    static let exports = [disk, iso]
}

/// What an NBD client sends during the handshake.
enum Client {
    static func flags(_ flags: ClientFlags = [.fixedNewstyle, .noZeroes]) -> [UInt8] { u32(flags.rawValue) }

    static func option(_ code: UInt32, _ data: [UInt8] = []) -> [UInt8] {
        u64(NBDMagic.option) + u32(code) + u32(UInt32(data.count)) + data
    }

    static func option(_ type: OptionType, _ data: [UInt8] = []) -> [UInt8] { option(type.rawValue, data) }

    /// A u32 length followed by UTF-8.
    static func string(_ s: String) -> [UInt8] { u32(UInt32(s.utf8.count)) + Array(s.utf8) }

    /// INFO / GO data: name, then the info requests.
    static func info(_ name: String, _ requests: [InfoType] = []) -> [UInt8] {
        string(name) + u16(UInt16(requests.count)) + requests.flatMap { u16($0.rawValue) }
    }

    /// LIST_META_CONTEXT / SET_META_CONTEXT data: name, then the queries.
    static func meta(_ name: String, _ queries: [String]) -> [UInt8] {
        string(name) + u32(UInt32(queries.count)) + queries.flatMap(string)
    }
}

/// One decoded option reply.
struct OptionReply: Equatable, CustomStringConvertible {
    var option: UInt32
    var type: UInt32
    var data: [UInt8]

    init(option: UInt32, type: UInt32, data: [UInt8] = []) {
        self.option = option
        self.type = type
        self.data = data
    }

    init(_ option: OptionType, _ type: OptionReplyType, _ data: [UInt8] = []) {
        self.init(option: option.rawValue, type: type.rawValue, data: data)
    }

    var encoded: [UInt8] { u64(NBDMagic.optionReply) + u32(option) + u32(type) + u32(UInt32(data.count)) + data }

    var description: String {
        let name = OptionReplyType(rawValue: type).map { "\($0)" } ?? "0x\(String(type, radix: 16))"
        return "reply(option \(option), \(name), \(data.count) bytes)"
    }

    /// Splits `bytes` into option replies; nil if they are not a clean sequence of them.
    static func decode(_ bytes: [UInt8]) -> [OptionReply]? {
        var replies: [OptionReply] = []
        var offset = 0
        while offset < bytes.count {
            guard bytes.count - offset >= 20,
                  bytes.loadBigEndian(at: offset, as: UInt64.self) == NBDMagic.optionReply else { return nil }
            let length = Int(bytes.loadBigEndian(at: offset + 16, as: UInt32.self))
            guard bytes.count - offset - 20 >= length else { return nil }
            replies.append(OptionReply(option: bytes.loadBigEndian(at: offset + 8),
                                       type: bytes.loadBigEndian(at: offset + 12),
                                       data: Array(bytes[offset + 20 ..< offset + 20 + length])))
            offset += 20 + length
        }
        return replies
    }
}

/// A handshake's outcome with `consumed` counted over the whole input, so that
/// runs with different chunkings compare equal.
enum Outcome: Equatable {
    case needMore
    case finished(Negotiated, consumed: Int)
    case close
    case startTLS(consumed: Int)
}

struct HandshakeRun {
    var outcome: Outcome
    var reply: [UInt8]
    /// The state machine as it was left, and how many input bytes it was given.
    var handshake: Handshake
    var fed: Int

    var replies: [OptionReply]? { OptionReply.decode(reply) }
    var replyTypes: [OptionReplyType]? { replies?.map { OptionReplyType(rawValue: $0.type)! } }
    var negotiated: Negotiated? {
        if case .finished(let negotiated, _) = outcome { return negotiated }
        return nil
    }
}

extension Handshake {
    mutating func feed(_ bytes: [UInt8], reply: inout [UInt8]) -> Step {
        bytes.withUnsafeBytes { receive($0, reply: &reply) }
    }
}

/// Feeds `input` in chunks of `chunkSize(remaining)` bytes until the handshake
/// finishes, closes or runs out of input. Checks `consumed` against each chunk.
func runHandshake(_ input: [UInt8], exports: [ExportDescription] = Fixtures.exports,
                  chunkSize: (Int) -> Int = { $0 }) -> HandshakeRun {
    var handshake = Handshake(exports: exports)
    var reply: [UInt8] = []
    var offset = 0
    while offset < input.count {
        let size = max(1, min(chunkSize(input.count - offset), input.count - offset))
        let chunk = Array(input[offset ..< offset + size])
        let step = handshake.feed(chunk, reply: &reply)
        switch step {
        case .needMore:
            offset += size
        case .finished(let negotiated, let consumed):
            #expect(consumed >= 0 && consumed <= size, "consumed \(consumed) of a \(size)-byte chunk")
            return HandshakeRun(outcome: .finished(negotiated, consumed: offset + consumed),
                                reply: reply, handshake: handshake, fed: offset + size)
        case .close:
            return HandshakeRun(outcome: .close, reply: reply, handshake: handshake, fed: offset + size)
        case .startTLS(let consumed):
            return HandshakeRun(outcome: .startTLS(consumed: offset + consumed), reply: reply, handshake: handshake,
                                fed: offset + size)
        }
    }
    return HandshakeRun(outcome: .needMore, reply: reply, handshake: handshake, fed: offset)
}

/// A RequestParser event with its payload copied out, so it can be compared.
enum ParsedEvent: Equatable {
    case header(RequestHeader)
    case payload([UInt8], isLast: Bool)
    case badMagic(UInt32)
}

/// Runs `parser` over `chunk` until it wants more bytes or reports bad magic.
func parse(_ chunk: [UInt8], with parser: inout RequestParser) -> [ParsedEvent] {
    chunk.withUnsafeBytes { raw in
        var input = raw
        var events: [ParsedEvent] = []
        while let event = parser.next(from: &input) {
            switch event {
            case .header(let header): events.append(.header(header))
            case .payload(let piece, let isLast): events.append(.payload(Array(piece), isLast: isLast))
            case .badMagic(let magic): events.append(.badMagic(magic)); return events
            }
        }
        #expect(input.isEmpty, "the parser asked for more input with \(input.count) bytes left")
        return events
    }
}

/// Joins adjacent payload pieces so that events from different chunkings compare equal.
func coalesced(_ events: [ParsedEvent]) -> [ParsedEvent] {
    var result: [ParsedEvent] = []
    for event in events {
        if case .payload(let more, let isLast) = event, case .payload(let bytes, false)? = result.last {
            result[result.count - 1] = .payload(bytes + more, isLast: isLast)
        } else {
            result.append(event)
        }
    }
    return result
}

/// Named input for parameterized tests, so logs show the name rather than the bytes.
struct Script: CustomTestStringConvertible, Sendable {
    let name: String
    let bytes: [UInt8]
    init(_ name: String, _ bytes: [UInt8]) { self.name = name; self.bytes = bytes }
    var testDescription: String { name }
}
