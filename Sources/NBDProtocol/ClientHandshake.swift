/// The client's half of the fixed-newstyle handshake, for a client that hands
/// the socket on once transmission may start (the kernel's NBD driver speaks
/// transmission only): greeting, client flags, optionally STARTTLS, then GO
/// with the export name. Simple replies only, as the kernel reads them. Fed
/// the server's bytes, it appends what to send to `send`; it owns no socket.
public struct ClientHandshake {
    public enum Step: Equatable {
        case needMore
        /// Transmission may start; `consumed` bytes of the last input belonged to the handshake.
        case finished(size: UInt64, flags: TransmissionFlags, consumed: Int)
        /// The server acknowledged STARTTLS: run the TLS handshake on the
        /// socket, then call `resumeInsideTLS` and go on with the session's plaintext.
        case startTLS(consumed: Int)
        case failed(String)
    }

    /// Option replies longer than this are not from a server that means well.
    public static let maximumReplyLength = 64 * 1024

    private enum State {
        case greeting
        case replyHeader
        case replyData(option: UInt32, type: UInt32, length: Int)
        case done
    }

    private let exportName: String
    private let startTLS: Bool
    private var state = State.greeting
    private var assembler = MessageAssembler()
    private var export: (size: UInt64, flags: TransmissionFlags)?

    public init(exportName: String, startTLS: Bool = false) {
        precondition(exportName.utf8.count <= 4096, "NBD export names are at most 4096 bytes")
        self.exportName = exportName
        self.startTLS = startTLS
    }

    public mutating func receive(_ input: UnsafeRawBufferPointer, send: inout [UInt8]) -> Step {
        var offset = 0
        while true {
            let needed: Int
            switch state {
            case .greeting: needed = 18
            case .replyHeader: needed = 20
            case .replyData(_, _, let length): needed = length
            case .done: return .failed("the server sent data after the handshake ended")
            }
            guard let message = assembler.take(needed, from: input, at: &offset) else { return .needMore }
            switch advance(with: message, send: &send) {
            case .needMore: continue
            case .finished(let size, let flags, _): return .finished(size: size, flags: flags, consumed: offset)
            case .startTLS: return .startTLS(consumed: offset)
            case .failed(let reason):
                state = .done
                return .failed(reason)
            }
        }
    }

    /// After the TLS handshake: the options go on inside the session.
    public mutating func resumeInsideTLS(send: inout [UInt8]) {
        appendGo(&send)
    }

    private mutating func advance(with message: [UInt8], send: inout [UInt8]) -> Step {
        switch state {
        case .greeting:
            guard message.loadBigEndian(at: 0, as: UInt64.self) == NBDMagic.initPassword,
                  message.loadBigEndian(at: 8, as: UInt64.self) == NBDMagic.option else {
                return .failed("the server does not speak newstyle NBD")
            }
            let flags = HandshakeFlags(rawValue: message.loadBigEndian(at: 16, as: UInt16.self))
            guard flags.contains(.fixedNewstyle) else { return .failed("the server does not speak fixed newstyle NBD") }
            send.appendBigEndian(ClientFlags(flags.contains(.noZeroes) ? [.fixedNewstyle, .noZeroes] : [.fixedNewstyle]).rawValue)
            if startTLS { appendOption(&send, .startTLS, data: []) } else { appendGo(&send) }
            state = .replyHeader
            return .needMore
        case .replyHeader:
            guard message.loadBigEndian(at: 0, as: UInt64.self) == NBDMagic.optionReply else {
                return .failed("an option reply without its magic")
            }
            let option = message.loadBigEndian(at: 8, as: UInt32.self)
            let type = message.loadBigEndian(at: 12, as: UInt32.self)
            let length = Int(message.loadBigEndian(at: 16, as: UInt32.self))
            guard length <= Self.maximumReplyLength else { return .failed("an option reply of \(length) bytes") }
            state = .replyData(option: option, type: type, length: length)
            return length == 0 ? advance(with: [], send: &send) : .needMore
        case .replyData(let option, let type, _):
            state = .replyHeader
            return handleReply(option: option, type: type, data: message)
        case .done:
            preconditionFailure("nothing is assembled after the handshake")
        }
    }

    private mutating func handleReply(option: UInt32, type: UInt32, data: [UInt8]) -> Step {
        let asked: OptionType = startTLS && option == OptionType.startTLS.rawValue ? .startTLS : .go
        guard option == asked.rawValue else { return .failed("a reply to option \(option), which was not sent") }
        if type & 0x8000_0000 != 0 {
            let message = String(decoding: data, as: UTF8.self)
            let what = OptionReplyType(rawValue: type).map { "\($0)" } ?? "error \(type)"
            return .failed("the server refused \(asked == .startTLS ? "STARTTLS" : "the export '\(exportName)'"): \(what)"
                + (message.isEmpty ? "" : ": \(message)"))
        }
        switch (asked, OptionReplyType(rawValue: type)) {
        case (.startTLS, .ack?):
            return .startTLS(consumed: 0)
        case (.go, .info?):
            if data.count >= 12, data.loadBigEndian(at: 0, as: UInt16.self) == InfoType.export.rawValue {
                export = (data.loadBigEndian(at: 2, as: UInt64.self),
                          TransmissionFlags(rawValue: data.loadBigEndian(at: 10, as: UInt16.self)))
            }
            return .needMore
        case (.go, .ack?):
            guard let export else { return .failed("the server accepted GO without saying the export's size") }
            state = .done
            return .finished(size: export.size, flags: export.flags, consumed: 0)
        default:
            return .failed("an unexpected reply \(type) to option \(option)")
        }
    }

    private func appendGo(_ send: inout [UInt8]) {
        var data: [UInt8] = []
        data.appendBigEndian(UInt32(exportName.utf8.count))
        data.append(contentsOf: exportName.utf8)
        data.appendBigEndian(UInt16(0))
        appendOption(&send, .go, data: data)
    }

    private func appendOption(_ send: inout [UInt8], _ option: OptionType, data: [UInt8]) {
        send.appendBigEndian(NBDMagic.option)
        send.appendBigEndian(option.rawValue)
        send.appendBigEndian(UInt32(data.count))
        send.append(contentsOf: data)
    }
}
