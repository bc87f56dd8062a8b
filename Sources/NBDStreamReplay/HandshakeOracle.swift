import NBDProtocol

/// Checks the server's handshake replies against the client's options,
/// which it parses itself, apart from `Handshake`: each option is answered,
/// in order, by replies of the kinds that option may have, ending in exactly
/// one ACK or error; nothing is left unanswered but an option whose data is
/// still arriving; EXPORT_NAME is answered by the export's size and flags
/// (and 124 zeroes unless the client said NO_ZEROES); GO's negotiation is
/// one the catalog offers. Under a TLS policy, STARTTLS is acknowledged
/// once and only where TLS is offered, and with `require` every other option
/// but ABORT before it is refused with ERR_TLS_REQD alone.
struct HandshakeOracle {
    enum After {
        case needMore
        case closed
        case finished(Negotiated)
        case startedTLS
    }

    private let exports: [ExportDescription]
    private let tls: Handshake.TLSPolicy
    private var secured = false

    // The client's side, as parsed here.
    private var pending: [UInt8] = []
    private var flagsRead = false
    private var noZeroes = false
    private var dataRemaining = 0
    private var sawBadMagic = false
    /// The options whose header has arrived, in order, with their data's length.
    private var options: [UInt32] = []
    private var optionLengths: [Int] = []

    // The server's side.
    private var replyChecked = 0
    private var answered = 0

    init(exports: [ExportDescription], tls: Handshake.TLSPolicy) {
        self.exports = exports
        self.tls = tls
    }

    mutating func clientSent(_ bytes: UnsafeRawBufferPointer) {
        var offset = 0
        while offset < bytes.count, !sawBadMagic {
            if dataRemaining > 0 {
                let take = min(dataRemaining, bytes.count - offset)
                dataRemaining -= take
                offset += take
                continue
            }
            let needed = flagsRead ? 16 : 4
            let take = min(needed - pending.count, bytes.count - offset)
            pending.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + take]))
            offset += take
            guard pending.count == needed else { continue }
            if !flagsRead {
                flagsRead = true
                noZeroes = pending.loadBigEndian(at: 0, as: UInt32.self) & ClientFlags.noZeroes.rawValue != 0
            } else if pending.loadBigEndian(at: 0, as: UInt64.self) != NBDMagic.option {
                sawBadMagic = true
            } else {
                options.append(pending.loadBigEndian(at: 8, as: UInt32.self))
                dataRemaining = Int(pending.loadBigEndian(at: 12, as: UInt32.self))
                optionLengths.append(dataRemaining)
            }
            pending.removeAll(keepingCapacity: true)
        }
    }

    mutating func check(reply: [UInt8], after: After) {
        let endsWithExportName: Bool
        if case .finished = after, options.last == OptionType.exportName.rawValue {
            endsWithExportName = true
        } else {
            endsWithExportName = false
        }
        let framesEnd = endsWithExportName ? reply.count - (noZeroes ? 10 : 134) : reply.count
        precondition(framesEnd >= replyChecked, "EXPORT_NAME was answered with \(reply.count - replyChecked) bytes")
        while replyChecked < framesEnd {
            checkFrame(in: reply, end: framesEnd)
        }

        let unanswered = options.count - answered
        switch after {
        case .needMore:
            precondition(!sawBadMagic, "an option without the IHAVEOPT magic did not close the handshake")
            precondition(unanswered == 0 || (unanswered == 1 && dataRemaining > 0),
                         "\(unanswered) complete options have no final reply")
        case .closed:
            break
        case .startedTLS:
            precondition(options.last == OptionType.startTLS.rawValue && unanswered == 0 && secured,
                         "TLS started without STARTTLS acknowledged last")
            precondition(dataRemaining == 0 && pending.isEmpty, "TLS started inside an option")
        case .finished(let negotiated):
            precondition(tls != .require || secured, "transmission without TLS, which the server requires")
            precondition(dataRemaining == 0 && pending.isEmpty, "the handshake finished inside an option")
            checkNegotiated(negotiated)
            if endsWithExportName {
                precondition(unanswered == 1, "EXPORT_NAME finished with \(unanswered - 1) other options unanswered")
                let export = negotiated.export
                precondition(reply.loadBigEndian(at: framesEnd, as: UInt64.self) == export.size, "EXPORT_NAME's size")
                precondition(reply.loadBigEndian(at: framesEnd + 8, as: UInt16.self) == negotiated.transmissionFlags.rawValue,
                             "EXPORT_NAME's transmission flags")
                precondition(reply[(framesEnd + 10)...].allSatisfy { $0 == 0 }, "EXPORT_NAME's zeroes")
            } else {
                precondition(options.last == OptionType.go.rawValue, "the handshake finished on option \(options.last ?? 0)")
                precondition(unanswered == 0, "GO finished with options unanswered")
            }
        }
    }

    /// One option reply: its magic, the option it answers, a type that option may have, a whole body.
    private mutating func checkFrame(in reply: [UInt8], end: Int) {
        precondition(end - replyChecked >= 20, "a partial option reply header")
        precondition(reply.loadBigEndian(at: replyChecked, as: UInt64.self) == NBDMagic.optionReply, "option reply magic")
        let option = reply.loadBigEndian(at: replyChecked + 8, as: UInt32.self)
        let type = reply.loadBigEndian(at: replyChecked + 12, as: UInt32.self)
        let length = Int(reply.loadBigEndian(at: replyChecked + 16, as: UInt32.self))
        precondition(end - replyChecked - 20 >= length, "a partial option reply body")
        let body = Array(reply[(replyChecked + 20)..<(replyChecked + 20 + length)])
        replyChecked += 20 + length

        precondition(answered < options.count, "a reply to an option the client did not send")
        precondition(option == options[answered], "reply for option \(option) while \(options[answered]) waits")
        precondition(option != OptionType.exportName.rawValue, "EXPORT_NAME has no option replies")
        let refusedForTLS = tls == .require && !secured
            && option != OptionType.startTLS.rawValue && option != OptionType.abort.rawValue
        if type == OptionReplyType.ack.rawValue || type & 0x8000_0000 != 0 {
            precondition(OptionReplyType(rawValue: type) != nil, "unknown option reply type 0x\(String(type, radix: 16))")
            precondition(!refusedForTLS || OptionReplyType(rawValue: type) == .errTLSRequired || optionLengths[answered] > Handshake.maximumOptionLength,
                         "option \(option) answered without TLS, which the server requires")
            if option == OptionType.startTLS.rawValue {
                let acceptable = tls != .off && !secured && optionLengths[answered] == 0
                precondition((type == OptionReplyType.ack.rawValue) == acceptable, "STARTTLS answered 0x\(String(type, radix: 16))")
                if acceptable { secured = true }
            }
            answered += 1
            return
        }
        precondition(!refusedForTLS, "option \(option) answered without TLS, which the server requires")
        switch OptionReplyType(rawValue: type) {
        case .server?:
            precondition(option == OptionType.list.rawValue, "SERVER answers only LIST")
        case .info?:
            precondition(option == OptionType.info.rawValue || option == OptionType.go.rawValue, "INFO answers only INFO and GO")
            checkInfo(body)
        case .metaContext?:
            precondition(option == OptionType.listMetaContext.rawValue || option == OptionType.setMetaContext.rawValue,
                         "META_CONTEXT answers only the meta context options")
        default:
            preconditionFailure("option reply type 0x\(String(type, radix: 16)) is not an informational one")
        }
    }

    private func checkInfo(_ body: [UInt8]) {
        precondition(body.count >= 2, "an INFO reply without its type")
        switch InfoType(rawValue: body.loadBigEndian(at: 0, as: UInt16.self)) {
        case .export?:
            precondition(body.count == 12, "NBD_INFO_EXPORT is 12 bytes")
            let size = body.loadBigEndian(at: 2, as: UInt64.self)
            precondition(exports.contains { $0.size == size }, "NBD_INFO_EXPORT's size \(size) is no export's")
        case .blockSize?:
            precondition(body.count == 14, "NBD_INFO_BLOCK_SIZE is 14 bytes")
            let minimum = body.loadBigEndian(at: 2, as: UInt32.self)
            let preferred = body.loadBigEndian(at: 6, as: UInt32.self)
            let maximum = body.loadBigEndian(at: 10, as: UInt32.self)
            precondition(minimum.nonzeroBitCount == 1 && minimum <= preferred && preferred <= maximum,
                         "block sizes \(minimum) \(preferred) \(maximum)")
        case .name?, .description?:
            break
        case nil:
            preconditionFailure("an INFO reply of unknown type")
        }
    }

    private func checkNegotiated(_ negotiated: Negotiated) {
        let export = negotiated.export
        precondition(exports.contains(export), "transmission on an export the catalog does not have")
        precondition(negotiated.structuredReplies || !negotiated.answersBlockStatus,
                     "meta contexts without structured replies")
        if let extra = negotiated.extraContext {
            precondition(export.metaContexts.contains(extra), "context \(extra.name) is not offered by \(export.name)")
        }
        precondition(negotiated.transmissionFlags.contains(.readOnly) == export.readOnly, "read-only flag")
    }
}
