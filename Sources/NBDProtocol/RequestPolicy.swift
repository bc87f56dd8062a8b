/// Decides, from the header alone, whether a request may run. Pure: the
/// server asks it before touching any buffer or file.
public struct RequestPolicy: Sendable {
    public enum Verdict: Equatable, Sendable {
        case accept(CommandType)
        /// Answer with this error (after reading any WRITE payload).
        case reject(NBDError)
        /// The stream cannot be trusted any more (or DISC): close after in-flight work.
        case disconnect
    }

    public let negotiated: Negotiated
    private let flags: TransmissionFlags

    public init(_ negotiated: Negotiated) {
        self.negotiated = negotiated
        flags = negotiated.transmissionFlags
    }

    public func check(_ header: RequestHeader) -> Verdict {
        guard let command = header.command else { return .reject(.invalid) }
        // DISC never gets a reply, whatever flags came with it.
        if command == .disconnect { return .disconnect }
        let export = negotiated.export
        let maximum = export.blockSizes.maximum
        if command == .write && header.length > maximum {
            // Its payload may be huge; the protocol allows a hard disconnect here.
            return .disconnect
        }
        guard header.commandFlags.isSubset(of: allowedFlags(for: command)) else { return .reject(.invalid) }

        switch command {
        case .disconnect:
            preconditionFailure("handled above")
        case .flush:
            return .accept(.flush)
        case .read, .cache:
            if header.length > maximum { return .reject(.invalid) }
            return inRange(header) ? .accept(command) : .reject(.invalid)
        case .write, .writeZeroes:
            if export.readOnly { return .reject(.permission) }
            return inRange(header) ? .accept(command) : .reject(.noSpace)
        case .trim:
            if export.readOnly { return .reject(.permission) }
            return inRange(header) ? .accept(.trim) : .reject(.invalid)
        case .blockStatus:
            guard negotiated.answersBlockStatus, header.length > 0 else { return .reject(.invalid) }
            return inRange(header) ? .accept(.blockStatus) : .reject(.invalid)
        }
    }

    private func inRange(_ header: RequestHeader) -> Bool {
        let size = negotiated.export.size
        return UInt64(header.length) <= size && header.offset <= size - UInt64(header.length)
    }

    private func allowedFlags(for command: CommandType) -> CommandFlags {
        var allowed: CommandFlags = flags.contains(.sendFUA) ? [.fua] : []
        switch command {
        case .read where flags.contains(.sendDF): allowed.insert(.dontFragment)
        case .writeZeroes:
            allowed.insert(.noHole)
            if flags.contains(.sendFastZero) { allowed.insert(.fastZero) }
        case .blockStatus: allowed.insert(.requestOne)
        default: break
        }
        return allowed
    }
}
