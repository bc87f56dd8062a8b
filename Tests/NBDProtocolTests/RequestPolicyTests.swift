import NBDProtocol
import Testing

/// RequestPolicy: every verdict it can give, from the header alone.
@Suite struct RequestPolicyTests {
    static let size: UInt64 = 1 << 30
    static let max = BlockSizes.maximumPayload
    static let writable = ExportDescription(name: "rw", size: size, readOnly: false)
    static let readOnly = ExportDescription(name: "ro", size: size, readOnly: true)

    /// Structured replies and base:allocation on, unless said otherwise.
    func policy(_ export: ExportDescription = writable, structured: Bool = true,
                baseAllocation: Bool = true) -> RequestPolicy {
        RequestPolicy(Negotiated(export: export, structuredReplies: structured, baseAllocation: baseAllocation))
    }

    func check(_ type: CommandType, _ flags: CommandFlags = [], offset: UInt64 = 0, length: UInt32 = 512,
               on policy: RequestPolicy? = nil) -> RequestPolicy.Verdict {
        (policy ?? self.policy()).check(RequestHeader(type: type, flags: flags, handle: 1, offset: offset, length: length))
    }

    @Test(arguments: [UInt16(8), 9, 0x100, 0xFFFF])
    func unknownCommandIsInvalid(_ type: UInt16) {
        #expect(policy().check(RequestHeader(flags: 0, type: type, handle: 1, offset: 0, length: 0)) == .reject(.invalid))
    }

    @Test(arguments: [CommandType.read, .write, .flush, .trim, .cache, .writeZeroes, .blockStatus])
    func unknownFlagIsInvalid(_ type: CommandType) {
        for bit in 5 ..< 16 {
            let header = RequestHeader(flags: 1 << bit, type: type.rawValue, handle: 1, offset: 0, length: 512)
            #expect(policy().check(header) == .reject(.invalid), "flag bit \(bit)")
        }
    }

    @Test(arguments: [
        (CommandType.write, CommandFlags.noHole), (.read, .noHole), (.trim, .noHole),
        (.write, .dontFragment), (.cache, .dontFragment), (.writeZeroes, .dontFragment),
        (.read, .requestOne), (.writeZeroes, .requestOne), (.flush, .requestOne),
        (.read, .fastZero), (.write, .fastZero), (.trim, .fastZero), (.blockStatus, .fastZero),
    ])
    func flagNotForThisCommandIsInvalid(_ type: CommandType, _ flag: CommandFlags) {
        #expect(check(type, flag) == .reject(.invalid))
    }

    @Test(arguments: [
        (CommandType.read, CommandType.read), (.write, .write), (.flush, .flush), (.trim, .trim),
        (.cache, .cache), (.writeZeroes, .writeZeroes), (.blockStatus, .blockStatus),
    ])
    func fuaIsAllowedOnAllCommands(_ type: CommandType, _ accepted: CommandType) {
        #expect(check(type, .fua) == .accept(accepted))
    }

    @Test func fuaOnDisconnectStillDisconnects() {
        #expect(check(.disconnect, .fua, length: 0) == .disconnect)
    }

    @Test func commandSpecificFlags() {
        #expect(check(.read, [.fua, .dontFragment]) == .accept(.read))
        #expect(check(.writeZeroes, [.fua, .noHole, .fastZero]) == .accept(.writeZeroes))
        #expect(check(.blockStatus, [.fua, .requestOne]) == .accept(.blockStatus))
    }

    @Test func dontFragmentNeedsStructuredReplies() {
        #expect(check(.read, .dontFragment, on: policy(structured: false)) == .reject(.invalid))
    }

    @Test func fastZeroOnlyWhenAdvertised() {
        // A read-only export does not advertise SEND_FAST_ZERO.
        #expect(check(.writeZeroes, .fastZero, on: policy(Self.readOnly)) == .reject(.invalid))
    }

    @Test(arguments: [CommandType.read, .cache])
    func readRange(_ type: CommandType) {
        #expect(check(type, offset: Self.size - 512, length: 512) == .accept(type))
        #expect(check(type, offset: Self.size - 511, length: 512) == .reject(.invalid))
        #expect(check(type, offset: Self.size, length: 0) == .accept(type))
        #expect(check(type, offset: Self.size + 1, length: 0) == .reject(.invalid))
        #expect(check(type, length: Self.max) == .accept(type))
        #expect(check(type, length: Self.max + 1) == .reject(.invalid))
    }

    @Test func writeOverMaximumDisconnects() {
        #expect(check(.write, length: Self.max) == .accept(.write))
        #expect(check(.write, length: Self.max + 1) == .disconnect)
        #expect(check(.write, length: .max) == .disconnect)
        #expect(check(.write, length: Self.max + 1, on: policy(Self.readOnly)) == .disconnect)
    }

    @Test(arguments: [CommandType.write, .writeZeroes])
    func writeOutOfRangeIsNoSpace(_ type: CommandType) {
        #expect(check(type, offset: Self.size - 512, length: 512) == .accept(type))
        #expect(check(type, offset: Self.size - 511, length: 512) == .reject(.noSpace))
        #expect(check(type, offset: Self.size + 4096, length: 0) == .reject(.noSpace))
    }

    @Test func writeZeroesMayExceedMaximum() {
        #expect(check(.writeZeroes, length: Self.max + 1) == .accept(.writeZeroes))
        #expect(check(.trim, length: Self.max + 1) == .accept(.trim))
    }

    @Test func trimOutOfRangeIsInvalid() {
        #expect(check(.trim, offset: Self.size - 512, length: 512) == .accept(.trim))
        #expect(check(.trim, offset: Self.size - 511, length: 512) == .reject(.invalid))
    }

    @Test(arguments: [CommandType.write, .trim, .writeZeroes])
    func readOnlyRefusesWrites(_ type: CommandType) {
        #expect(check(type, on: policy(Self.readOnly)) == .reject(.permission))
        #expect(check(type, .fua, offset: Self.size, on: policy(Self.readOnly)) == .reject(.permission))
    }

    @Test(arguments: [CommandType.read, .cache, .flush, .blockStatus])
    func readOnlyAllowsReads(_ type: CommandType) {
        #expect(check(type, on: policy(Self.readOnly)) == .accept(type))
    }

    @Test func blockStatus() {
        #expect(check(.blockStatus) == .accept(.blockStatus))
        #expect(check(.blockStatus, on: policy(baseAllocation: false)) == .reject(.invalid))
        #expect(check(.blockStatus, length: 0) == .reject(.invalid))
        #expect(check(.blockStatus, offset: Self.size - 511, length: 512) == .reject(.invalid))
        // A status query may exceed the maximum block size.
        #expect(check(.blockStatus, length: UInt32(Self.size)) == .accept(.blockStatus))
    }

    @Test func disconnectAndFlush() {
        #expect(check(.disconnect, length: 0) == .disconnect)
        // DISC never gets a reply, not even for flags it does not take.
        #expect(check(.disconnect, [.fastZero, .requestOne], length: 0) == .disconnect)
        #expect(check(.flush, length: 0) == .accept(.flush))
    }

    @Test(arguments: [CommandType.read, .write, .trim, .cache, .writeZeroes, .blockStatus])
    func offsetPlusLengthOverflowIsRejected(_ type: CommandType) {
        let expected: NBDError = type == .write || type == .writeZeroes ? .noSpace : .invalid
        for offset: UInt64 in [.max, .max - 1, .max - 511, 1 << 63] {
            #expect(check(type, offset: offset, length: 512) == .reject(expected), "offset \(offset)")
        }
        // Also against an export as large as the offset space.
        let huge = ExportDescription(name: "huge", size: .max, readOnly: false)
        #expect(check(type, offset: .max, length: 1, on: policy(huge)) == .reject(expected))
        #expect(check(type, offset: .max - 1, length: 1, on: policy(huge)) == .accept(type))
    }
}
