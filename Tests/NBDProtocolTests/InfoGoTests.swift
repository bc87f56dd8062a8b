import NBDProtocol
import Testing

/// NBD_OPT_INFO and NBD_OPT_GO: reply layout, errors, and where transmission starts.
@Suite struct InfoGoTests {
    let hello = Client.flags()

    /// The INFO replies every successful INFO/GO sends for `export`: EXPORT then BLOCK_SIZE.
    func mandatoryInfo(_ option: OptionType, _ export: ExportDescription, structured: Bool = false) -> [OptionReply] {
        [
            OptionReply(option, .info, u16(InfoType.export.rawValue) + u64(export.size)
                        + u16(export.transmissionFlags(structuredReplies: structured).rawValue)),
            OptionReply(option, .info, u16(InfoType.blockSize.rawValue) + u32(1) + u32(4096) + u32(32 << 20)),
        ]
    }

    @Test func infoLayoutAndHandshakeContinues() {
        let run = runHandshake(hello + Client.option(.info, Client.info("disk")))
        #expect(run.outcome == .needMore)
        #expect(run.replies == mandatoryInfo(.info, Fixtures.disk) + [OptionReply(.info, .ack)])
        // Fixed lengths from the protocol: EXPORT is 12 bytes, BLOCK_SIZE 14.
        #expect(run.replies?.prefix(2).map(\.data.count) == [12, 14])
    }

    @Test func goLayoutFinishes() {
        let run = runHandshake(hello + Client.option(.go, Client.info("iso")))
        #expect(run.replies == mandatoryInfo(.go, Fixtures.iso) + [OptionReply(.go, .ack)])
        #expect(run.negotiated == Negotiated(export: Fixtures.iso, structuredReplies: false, baseAllocation: false))
    }

    @Test(arguments: [OptionType.info, .go])
    func nameWhenRequested(_ option: OptionType) {
        // The empty name is the default export; NAME reports its real name.
        let run = runHandshake(hello + Client.option(option, Client.info("", [.name])))
        #expect(run.replies == mandatoryInfo(option, Fixtures.disk) + [
            OptionReply(option, .info, u16(InfoType.name.rawValue) + Array("disk".utf8)),
            OptionReply(option, .ack),
        ])
    }

    @Test func descriptionWhenRequestedAndNonEmpty() {
        let run = runHandshake(hello + Client.option(.info, Client.info("disk", [.description, .blockSize]))
                               + Client.option(.info, Client.info("iso", [.description])))
        #expect(run.replies == mandatoryInfo(.info, Fixtures.disk) + [
            OptionReply(.info, .info, u16(InfoType.description.rawValue) + Array("main disk".utf8)),
            OptionReply(.info, .ack),
        ] + mandatoryInfo(.info, Fixtures.iso) + [OptionReply(.info, .ack)])
    }

    @Test func unknownInfoRequestsAreIgnored() {
        let data = Client.string("disk") + u16(2) + u16(0x7777) + u16(0xFFFF)
        let run = runHandshake(hello + Client.option(.info, data))
        #expect(run.replies == mandatoryInfo(.info, Fixtures.disk) + [OptionReply(.info, .ack)])
    }

    @Test(arguments: [OptionType.info, .go])
    func unknownExport(_ option: OptionType) {
        let run = runHandshake(hello + Client.option(option, Client.info("nope", [.name]))
                               + Client.option(.go, Client.info("disk")))
        #expect(run.replies?.first?.option == option.rawValue)
        #expect(run.replyTypes == [.errUnknown, .info, .info, .ack])
        #expect(run.negotiated?.export == Fixtures.disk)
    }

    static let malformed: [[UInt8]] = [
        [],                                                        // nothing at all
        [0, 0, 0, 0, 0],                                           // shorter than 6 bytes
        u32(4) + Array("dis".utf8) + u16(0),                      // name longer than the data
        u32(0xFFFF_FFFF) + u16(0),                                 // absurd name length
        Client.string("disk"),                                     // no info count
        Client.string("disk") + u16(1),                            // count 1, no codes
        Client.string("disk") + u16(1) + u16(1) + [0],             // one byte too many
        Client.string("disk") + u16(2) + u16(1),                   // count 2, one code
        Client.string("disk") + u16(0) + u16(1),                   // count 0, one code
        u32(2) + [0xC3, 0x28] + u16(0),                            // name is not UTF-8
    ]

    @Test(arguments: [OptionType.info, .go], malformed)
    func malformedIsInvalidAndHandshakeGoesOn(_ option: OptionType, data: [UInt8]) {
        let run = runHandshake(hello + Client.option(option, data) + Client.option(.list))
        #expect(run.outcome == .needMore)
        #expect(run.replies?.first?.option == option.rawValue)
        #expect(run.replyTypes == [.errInvalid, .server, .server, .ack])
    }

    @Test func goWithoutNoZeroesHasNoPadding() {
        let run = runHandshake(Client.flags(.fixedNewstyle) + Client.option(.go, Client.info("disk")))
        #expect(run.replies == mandatoryInfo(.go, Fixtures.disk) + [OptionReply(.go, .ack)])
    }

    static let request = RequestHeader(type: .read, handle: 7, offset: 0, length: 512).encoded

    @Test(arguments: [
        Script("GO", Client.option(.go, Client.info("disk", [.name]))),
        Script("EXPORT_NAME", Client.option(.exportName, Array("disk".utf8))),
        Script("EXPORT_NAME default", Client.option(.exportName)),
        Script("oversized LIST, GO", Client.option(.list, [UInt8](repeating: 1, count: Handshake.maximumOptionLength + 5))
            + Client.option(.go, Client.info(""))),
    ])
    func consumedStopsWhereRequestsStart(_ finalOptions: Script) {
        let handshake = hello + Client.option(.structuredReply) + finalOptions.bytes
        for trailing in [[], Self.request, Self.request + Self.request] {
            let input = handshake + trailing
            var machine = Handshake(exports: Fixtures.exports)
            var reply: [UInt8] = []
            let step = machine.feed(input, reply: &reply)
            guard case .finished(let negotiated, let consumed) = step else {
                Issue.record("expected .finished, got \(step)")
                return
            }
            #expect(consumed == handshake.count)
            #expect(negotiated.export == Fixtures.disk)
            #expect(negotiated.structuredReplies)
        }
    }

    @Test func consumedCountsOnlyTheLastChunk() {
        let handshake = hello + Client.option(.go, Client.info("disk"))
        let chunks = [Array(handshake.prefix(10)), Array(handshake.dropFirst(10)) + Self.request]
        var machine = Handshake(exports: Fixtures.exports)
        var reply: [UInt8] = []
        #expect(machine.feed(chunks[0], reply: &reply) == .needMore)
        let step = machine.feed(chunks[1], reply: &reply)
        let negotiated = Negotiated(export: Fixtures.disk, structuredReplies: false, baseAllocation: false)
        #expect(step == .finished(negotiated, consumed: handshake.count - 10))
    }

    @Test func dataAfterFinishCloses() {
        var machine = Handshake(exports: Fixtures.exports)
        var reply: [UInt8] = []
        _ = machine.feed(hello + Client.option(.exportName), reply: &reply)
        let before = reply
        guard case .close = machine.feed(Self.request, reply: &reply) else {
            Issue.record("expected .close")
            return
        }
        #expect(reply == before)
    }

    /// Whole sessions, each ending in GO or EXPORT_NAME (or ABORT) followed by requests.
    static let sessions = [
        Script("every option, then GO", Client.option(42, [1, 2, 3]) + Client.option(.list)
            + Client.option(.structuredReply)
            + Client.option(.listMetaContext, Client.meta("disk", []))
            + Client.option(.setMetaContext, Client.meta("disk", ["base:allocation"]))
            + Client.option(.info, Client.info("disk", [.name, .description]))
            + Client.option(.go, Client.info("nope")) + Client.option(.go, Client.info("disk", [.blockSize]))
            + request),
        Script("errors, then EXPORT_NAME", Client.option(.startTLS) + Client.option(.list, [1])
            + Client.option(.exportName, Array("iso".utf8)) + request),
        Script("INFO, then ABORT", Client.option(.info, Client.info("iso")) + Client.option(.abort) + Client.option(.list)),
        Script("oversized LIST, then GO", Client.option(.list, [UInt8](repeating: 0, count: Handshake.maximumOptionLength + 1))
            + Client.option(.go, Client.info("")) + request),
    ]

    @Test(arguments: sessions)
    func oneByteChunksMatchOneChunk(_ session: Script) {
        let input = hello + session.bytes
        let whole = runHandshake(input)
        let bytewise = runHandshake(input, chunkSize: { _ in 1 })
        #expect(whole.outcome != .needMore)
        #expect(bytewise.outcome == whole.outcome)
        #expect(bytewise.reply == whole.reply)
    }
}
