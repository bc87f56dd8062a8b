import NBDProtocol

/// Feeds the transmission phase's bytes to `RequestParser` and asks
/// `RequestPolicy` about each header, then checks the verdict against the
/// protocol: what runs is in range, allowed on the export and carries only
/// flags the export advertised; a WRITE's payload arrives whole, only after
/// its header, and an accepted one lands inside a model of the export's
/// bytes; every reply header fits the space a request slot has for it.
struct TransmissionOracle {
    private let negotiated: Negotiated
    private let policy: RequestPolicy
    private var parser = RequestParser()
    private var model: [UInt8]
    private var replyHeader = [UInt8](repeating: 0, count: Reply.maximumHeaderSize)
    /// The WRITE whose payload is arriving.
    private var write: (offset: Int, accepted: Bool, length: Int, received: Int)?
    private(set) var requests = 0

    init(_ negotiated: Negotiated) {
        self.negotiated = negotiated
        policy = RequestPolicy(negotiated)
        model = [UInt8](repeating: 0, count: Int(negotiated.export.size))
    }

    /// Consumes all of `input`; false once the server would close the connection.
    mutating func receive(_ input: inout UnsafeRawBufferPointer) -> Bool {
        while let event = parser.next(from: &input) {
            switch event {
            case .badMagic:
                precondition(write == nil, "a request header was looked for inside a WRITE payload")
                return false
            case .header(let header):
                precondition(write == nil, "a request header was taken from a WRITE payload")
                requests += 1
                guard handle(header) else { return false }
            case .payload(let piece, let isLast):
                guard var current = write else { preconditionFailure("payload bytes without a WRITE") }
                precondition(current.received + piece.count <= current.length, "a WRITE payload longer than its header")
                if current.accepted {
                    model.withUnsafeMutableBytes { bytes in
                        bytes.baseAddress!.advanced(by: current.offset + current.received)
                            .copyMemory(from: piece.baseAddress!, byteCount: piece.count)
                    }
                }
                current.received += piece.count
                precondition(isLast == (current.received == current.length), "a WRITE payload's end")
                write = isLast ? nil : current
            }
        }
        precondition(input.isEmpty, "the request parser left \(input.count) bytes unread")
        return true
    }

    /// False when the verdict closes the connection.
    private mutating func handle(_ header: RequestHeader) -> Bool {
        let structured = negotiated.structuredReplies
        switch policy.check(header) {
        case .disconnect:
            precondition(header.command == .disconnect
                         || (header.command == .write && header.length > negotiated.export.blockSizes.maximum),
                         "a request closed the connection that could have been answered")
            return false
        case .reject(let error):
            let size = replyHeader.withUnsafeMutableBytes {
                Reply.writeStatus(to: $0.baseAddress!, handle: header.handle, error: error,
                                  structured: structured, isRead: header.command == .read)
            }
            precondition(size <= Reply.maximumHeaderSize)
            expectPayload(of: header, accepted: false)
            return true
        case .accept(let command):
            precondition(command == header.command, "accepted as another command")
            checkAccepted(command, header)
            expectPayload(of: header, accepted: true)
            return true
        }
    }

    private mutating func checkAccepted(_ command: CommandType, _ header: RequestHeader) {
        let structured = negotiated.structuredReplies
        let export = negotiated.export
        let advertised = negotiated.transmissionFlags
        let flags = header.commandFlags
        precondition(flags.isSubset(of: [.fua, .noHole, .dontFragment, .requestOne, .fastZero]), "unknown command flags")
        precondition(!flags.contains(.fua) || advertised.contains(.sendFUA), "FUA not advertised")
        precondition(!flags.contains(.noHole) || command == .writeZeroes, "NO_HOLE outside WRITE_ZEROES")
        precondition(!flags.contains(.fastZero) || (command == .writeZeroes && advertised.contains(.sendFastZero)),
                     "FAST_ZERO outside WRITE_ZEROES or not advertised")
        precondition(!flags.contains(.dontFragment) || (command == .read && advertised.contains(.sendDF)),
                     "DF outside READ or not advertised")
        precondition(!flags.contains(.requestOne) || command == .blockStatus, "REQ_ONE outside BLOCK_STATUS")

        let inRange = UInt64(header.length) <= export.size && header.offset <= export.size - UInt64(header.length)
        switch command {
        case .flush:
            break
        case .read, .cache:
            precondition(inRange, "\(command) out of range ran")
            precondition(header.length <= export.blockSizes.maximum, "a READ longer than the maximum ran")
            if command == .read {
                let size = replyHeader.withUnsafeMutableBytes {
                    structured
                        ? Reply.writeOffsetData(to: $0.baseAddress!, handle: header.handle, offset: header.offset,
                                                dataLength: header.length)
                        : Reply.writeSimple(to: $0.baseAddress!, handle: header.handle, error: nil)
                }
                precondition(size <= Reply.maximumHeaderSize)
            }
        case .write, .writeZeroes, .trim:
            precondition(!export.readOnly, "\(command) ran on a read-only export")
            precondition(inRange, "\(command) out of range ran")
        case .blockStatus:
            precondition(negotiated.answersBlockStatus, "BLOCK_STATUS ran with no context selected")
            precondition(header.length > 0 && inRange, "BLOCK_STATUS out of range ran")
        case .disconnect:
            preconditionFailure("DISC was accepted as a request")
        }
    }

    private mutating func expectPayload(of header: RequestHeader, accepted: Bool) {
        guard header.payloadLength > 0 else { return }
        write = (offset: Int(truncatingIfNeeded: header.offset), accepted: accepted,
                 length: Int(header.payloadLength), received: 0)
    }
}
