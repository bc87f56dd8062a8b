/// The fixed-newstyle handshake as a state machine: fed the client's bytes,
/// it appends the server's answers to `reply` and says when transmission
/// may start. It owns no socket, so it is tested and fuzzed with plain bytes.
public struct Handshake {
    public enum Step: Equatable {
        case needMore
        /// Transmission starts; `consumed` bytes of the last input belonged to the handshake.
        case finished(Negotiated, consumed: Int)
        /// Hard disconnect (after sending `reply`, if any).
        case close(reason: String)
        /// STARTTLS was acknowledged: once `reply` is sent, the bytes after
        /// `consumed` and all that follow are TLS records. The options go on
        /// inside the session: fed the plaintext, this state machine answers them.
        case startTLS(consumed: Int)
    }

    /// Whether the server offers TLS, and whether it serves anyone who does not start it.
    public enum TLSPolicy: Sendable {
        case off
        case on
        /// Every option but STARTTLS and ABORT is refused with ERR_TLS_REQD until TLS starts.
        case require
    }

    /// Larger options are read and discarded, then answered with ERR_TOO_BIG.
    public static let maximumOptionLength = 64 * 1024

    private enum State {
        case clientFlags
        case optionHeader
        case optionData(option: UInt32, length: Int)
        case discarding(option: UInt32, remaining: Int)
        case finished
        case closed
    }

    private let catalog: any ExportCatalog
    private let tls: TLSPolicy
    /// STARTTLS was acknowledged: the options come through TLS from now on.
    private var secured = false
    private var state = State.clientFlags
    private var assembler = MessageAssembler()
    private var clientNoZeroes = false
    private var structuredReplies = false
    /// What the last SET_META_CONTEXT selected, and for which export.
    private var selection: (export: String, baseAllocation: Bool, extra: MetaContextOffer?)?

    public init(catalog: any ExportCatalog, tls: TLSPolicy = .off) {
        self.catalog = catalog
        self.tls = tls
    }

    /// `exports[0]` is the default export, also reachable by the empty name.
    public init(exports: [ExportDescription]) {
        self.init(catalog: StaticExports(exports))
    }

    /// What the server sends as soon as a client connects.
    public static var greeting: [UInt8] {
        var bytes: [UInt8] = []
        bytes.appendBigEndian(NBDMagic.initPassword)
        bytes.appendBigEndian(NBDMagic.option)
        bytes.appendBigEndian(HandshakeFlags([.fixedNewstyle, .noZeroes]).rawValue)
        return bytes
    }

    public mutating func receive(_ input: UnsafeRawBufferPointer, reply: inout [UInt8]) -> Step {
        var offset = 0
        while true {
            switch state {
            case .finished, .closed:
                state = .closed
                return .close(reason: "data after the handshake ended")
            case .discarding(let option, let remaining):
                let take = min(remaining, input.count - offset)
                offset += take
                if take < remaining {
                    state = .discarding(option: option, remaining: remaining - take)
                    return .needMore
                }
                state = .optionHeader
                if option == OptionType.abort.rawValue {
                    // ABORT is acknowledged whatever data came with it.
                    appendOptionReply(&reply, option: option, type: .ack)
                    state = .closed
                    return .close(reason: "client aborted the handshake")
                }
                appendOptionReply(&reply, option: option, type: .errTooBig,
                                  message: "option data longer than \(Self.maximumOptionLength) bytes")
            case .clientFlags, .optionHeader, .optionData:
                let needed = bytesNeeded()
                guard let message = assembler.take(needed, from: input, at: &offset) else { return .needMore }
                switch advance(with: message, reply: &reply) {
                case .needMore: continue
                case .finished(let negotiated, _): return .finished(negotiated, consumed: offset)
                case .startTLS: return .startTLS(consumed: offset)
                case .close(let reason):
                    state = .closed
                    return .close(reason: reason)
                }
            }
        }
    }

    private func bytesNeeded() -> Int {
        switch state {
        case .clientFlags: return 4
        case .optionHeader: return 16
        case .optionData(_, let length): return length
        case .discarding, .finished, .closed: return 0
        }
    }

    private mutating func advance(with message: [UInt8], reply: inout [UInt8]) -> Step {
        switch state {
        case .clientFlags:
            let flags = ClientFlags(rawValue: message.loadBigEndian(at: 0, as: UInt32.self))
            guard flags.isSubset(of: [.fixedNewstyle, .noZeroes]) else {
                return .close(reason: "client flags 0x\(String(flags.rawValue, radix: 16)) are not known")
            }
            guard flags.contains(.fixedNewstyle) else {
                return .close(reason: "client does not speak fixed newstyle")
            }
            clientNoZeroes = flags.contains(.noZeroes)
            state = .optionHeader
            return .needMore
        case .optionHeader:
            guard message.loadBigEndian(at: 0, as: UInt64.self) == NBDMagic.option else {
                return .close(reason: "option without the IHAVEOPT magic")
            }
            let option = message.loadBigEndian(at: 8, as: UInt32.self)
            let length = Int(message.loadBigEndian(at: 12, as: UInt32.self))
            if length > Self.maximumOptionLength {
                // EXPORT_NAME has no error reply; a name that long is not one of ours.
                if option == OptionType.exportName.rawValue {
                    return .close(reason: "EXPORT_NAME longer than any export name")
                }
                state = .discarding(option: option, remaining: length)
            } else {
                state = .optionData(option: option, length: length)
                if length == 0 { return advance(with: [], reply: &reply) }
            }
            return .needMore
        case .optionData(let option, _):
            state = .optionHeader
            return handleOption(option, data: message, reply: &reply)
        case .discarding, .finished, .closed:
            preconditionFailure("no message is assembled in this state")
        }
    }

    // MARK: - Options

    private mutating func handleOption(_ code: UInt32, data: [UInt8], reply: inout [UInt8]) -> Step {
        if tls == .require && !secured && code != OptionType.startTLS.rawValue && code != OptionType.abort.rawValue {
            // EXPORT_NAME has no error reply: the only refusal is to hang up.
            if code == OptionType.exportName.rawValue {
                return .close(reason: "EXPORT_NAME without TLS, which this server requires")
            }
            appendOptionReply(&reply, option: code, type: .errTLSRequired,
                              message: "this server requires TLS: send STARTTLS first")
            return .needMore
        }
        guard let option = OptionType(rawValue: code) else {
            appendOptionReply(&reply, option: code, type: .errUnsupported, message: "option \(code) is not supported")
            return .needMore
        }
        switch option {
        case .exportName:
            guard let name = String(validating: data, as: UTF8.self),
                  case .found(let export) = catalog.resolve(name, opening: true) else {
                return .close(reason: "unknown or refused export requested with EXPORT_NAME")
            }
            reply.appendBigEndian(export.size)
            reply.appendBigEndian(export.transmissionFlags(structuredReplies: structuredReplies).rawValue)
            if !clientNoZeroes { reply.append(contentsOf: repeatElement(0, count: 124)) }
            return finish(with: export)
        case .abort:
            appendOptionReply(&reply, option: code, type: .ack)
            return .close(reason: "client aborted the handshake")
        case .list:
            guard data.isEmpty else {
                appendOptionReply(&reply, option: code, type: .errInvalid, message: "LIST takes no data")
                return .needMore
            }
            for export in catalog.listed {
                var payload: [UInt8] = []
                payload.appendBigEndian(UInt32(export.name.utf8.count))
                payload.append(contentsOf: export.name.utf8)
                payload.append(contentsOf: export.description.utf8)
                appendOptionReply(&reply, option: code, type: .server, payload: payload)
            }
            appendOptionReply(&reply, option: code, type: .ack)
            return .needMore
        case .startTLS:
            return startTLS(data: data, reply: &reply)
        case .info, .go:
            return handleInfo(option, data: data, reply: &reply)
        case .structuredReply:
            guard data.isEmpty else {
                appendOptionReply(&reply, option: code, type: .errInvalid, message: "STRUCTURED_REPLY takes no data")
                return .needMore
            }
            structuredReplies = true
            appendOptionReply(&reply, option: code, type: .ack)
            return .needMore
        case .listMetaContext, .setMetaContext:
            handleMetaContext(option, data: data, reply: &reply)
            return .needMore
        }
    }

    private mutating func startTLS(data: [UInt8], reply: inout [UInt8]) -> Step {
        let code = OptionType.startTLS.rawValue
        guard tls != .off else {
            appendOptionReply(&reply, option: code, type: .errUnsupported, message: "TLS is not enabled on this server")
            return .needMore
        }
        guard !secured else {
            appendOptionReply(&reply, option: code, type: .errInvalid, message: "TLS is already started")
            return .needMore
        }
        guard data.isEmpty else {
            appendOptionReply(&reply, option: code, type: .errInvalid, message: "STARTTLS takes no data")
            return .needMore
        }
        appendOptionReply(&reply, option: code, type: .ack)
        secured = true
        // Nothing negotiated in plaintext, where anyone on the path could
        // have written it, carries over into the session.
        structuredReplies = false
        selection = nil
        return .startTLS(consumed: 0)
    }

    private mutating func handleInfo(_ option: OptionType, data: [UInt8], reply: inout [UInt8]) -> Step {
        let code = option.rawValue
        var reader = OptionReader(data)
        guard let name = reader.string(), let count = reader.uint16(),
              reader.remaining == Int(count) * 2 else {
            appendOptionReply(&reply, option: code, type: .errInvalid, message: "malformed \(option) request")
            return .needMore
        }
        var requested: Set<UInt16> = []
        for _ in 0..<count { requested.insert(reader.uint16()!) }
        let export: ExportDescription
        switch catalog.resolve(name, opening: option == .go) {
        case .found(let found): export = found
        case .refused(let type, let message):
            appendOptionReply(&reply, option: code, type: type, message: message)
            return .needMore
        }
        var info: [UInt8] = []
        info.appendBigEndian(InfoType.export.rawValue)
        info.appendBigEndian(export.size)
        info.appendBigEndian(export.transmissionFlags(structuredReplies: structuredReplies).rawValue)
        appendOptionReply(&reply, option: code, type: .info, payload: info)

        // Sent unasked too: clients that understand it avoid out-of-range sizes.
        info = []
        info.appendBigEndian(InfoType.blockSize.rawValue)
        info.appendBigEndian(export.blockSizes.minimum)
        info.appendBigEndian(export.blockSizes.preferred)
        info.appendBigEndian(export.blockSizes.maximum)
        appendOptionReply(&reply, option: code, type: .info, payload: info)

        if requested.contains(InfoType.name.rawValue) {
            info = []
            info.appendBigEndian(InfoType.name.rawValue)
            info.append(contentsOf: export.name.utf8)
            appendOptionReply(&reply, option: code, type: .info, payload: info)
        }
        if requested.contains(InfoType.description.rawValue), !export.description.isEmpty {
            info = []
            info.appendBigEndian(InfoType.description.rawValue)
            info.append(contentsOf: export.description.utf8)
            appendOptionReply(&reply, option: code, type: .info, payload: info)
        }
        appendOptionReply(&reply, option: code, type: .ack)
        return option == .go ? finish(with: export) : .needMore
    }

    private mutating func handleMetaContext(_ option: OptionType, data: [UInt8], reply: inout [UInt8]) {
        let code = option.rawValue
        let isSet = option == .setMetaContext
        // A SET replaces earlier selections even when it fails.
        if isSet { selection = nil }
        guard structuredReplies || !isSet else {
            appendOptionReply(&reply, option: code, type: .errInvalid,
                              message: "SET_META_CONTEXT needs STRUCTURED_REPLY first")
            return
        }
        var reader = OptionReader(data)
        guard let name = reader.string(), let count = reader.uint32() else {
            appendOptionReply(&reply, option: code, type: .errInvalid, message: "malformed \(option) request")
            return
        }
        var queries: [String] = []
        for _ in 0..<count {
            guard let query = reader.string() else {
                appendOptionReply(&reply, option: code, type: .errInvalid, message: "malformed \(option) query")
                return
            }
            queries.append(query)
        }
        guard reader.remaining == 0 else {
            appendOptionReply(&reply, option: code, type: .errInvalid, message: "trailing data in \(option)")
            return
        }
        let export: ExportDescription
        switch catalog.resolve(name, opening: false) {
        case .found(let found): export = found
        case .refused(let type, let message):
            appendOptionReply(&reply, option: code, type: type, message: message)
            return
        }
        var base = false
        var extras: [MetaContextOffer] = []
        if isSet {
            // Exact names only; one context besides base:allocation (the first asked).
            base = queries.contains(MetaContext.baseAllocation)
            if let first = queries.lazy.compactMap({ query in export.metaContexts.first { $0.name == query } }).first {
                extras = [first]
            }
        } else {
            // An empty list, or a namespace ("base:", "keel:"), lists every context it covers.
            func matches(_ name: String) -> Bool {
                queries.isEmpty || queries.contains { $0 == name || ($0.hasSuffix(":") && name.hasPrefix($0)) }
            }
            base = matches(MetaContext.baseAllocation)
            extras = export.metaContexts.filter { matches($0.name) }
        }
        let answered = (base ? [(MetaContext.baseAllocationID, MetaContext.baseAllocation)] : []) + extras.map { ($0.id, $0.name) }
        for (id, contextName) in answered {
            var payload: [UInt8] = []
            payload.appendBigEndian(isSet ? id : 0)
            payload.append(contentsOf: contextName.utf8)
            appendOptionReply(&reply, option: code, type: .metaContext, payload: payload)
        }
        if isSet && !answered.isEmpty { selection = (export.name, base, extras.first) }
        appendOptionReply(&reply, option: code, type: .ack)
    }

    private mutating func finish(with export: ExportDescription) -> Step {
        state = .finished
        let selected = structuredReplies && selection?.export == export.name ? selection : nil
        let negotiated = Negotiated(export: export, structuredReplies: structuredReplies,
                                    baseAllocation: selected?.baseAllocation ?? false, extraContext: selected?.extra)
        return .finished(negotiated, consumed: 0)
    }


    private func appendOptionReply(_ reply: inout [UInt8], option: UInt32, type: OptionReplyType,
                                   payload: [UInt8] = [], message: String? = nil) {
        let body = message.map { Array($0.utf8) } ?? payload
        reply.appendBigEndian(NBDMagic.optionReply)
        reply.appendBigEndian(option)
        reply.appendBigEndian(type.rawValue)
        reply.appendBigEndian(UInt32(body.count))
        reply.append(contentsOf: body)
    }
}

/// Reads length-prefixed fields of an option's data, failing softly on truncation.
struct OptionReader {
    private let bytes: [UInt8]
    private var offset = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var remaining: Int { bytes.count - offset }

    mutating func uint16() -> UInt16? {
        guard remaining >= 2 else { return nil }
        defer { offset += 2 }
        return bytes.loadBigEndian(at: offset)
    }

    mutating func uint32() -> UInt32? {
        guard remaining >= 4 else { return nil }
        defer { offset += 4 }
        return bytes.loadBigEndian(at: offset)
    }

    /// A u32 length followed by that many bytes of UTF-8 (at most 4096, as the protocol says).
    mutating func string() -> String? {
        guard let length = uint32(), length <= 4096, remaining >= Int(length) else { return nil }
        defer { offset += Int(length) }
        return String(validating: bytes[offset..<offset + Int(length)], as: UTF8.self)
    }
}
