import NBDProtocol
import Testing

/// Greeting, client flags, option framing, and the options that need no export lookup.
@Suite struct HandshakeTests {
    let hello = Client.flags()

    @Test func greetingBytes() {
        #expect(Handshake.greeting == Array("NBDMAGIC".utf8) + Array("IHAVEOPT".utf8) + [0x00, 0x03])
    }

    @Test(arguments: [ClientFlags.fixedNewstyle, [.fixedNewstyle, .noZeroes]])
    func acceptedClientFlags(_ flags: ClientFlags) {
        let run = runHandshake(Client.flags(flags))
        #expect(run.outcome == .needMore)
        #expect(run.reply.isEmpty)
    }

    @Test(arguments: [UInt32(1 << 2), 1 << 2 | 1, 1 << 31 | 3, 0xFFFF_FFFF])
    func unknownClientFlagCloses(_ raw: UInt32) {
        let run = runHandshake(u32(raw) + Client.option(.list))
        #expect(run.outcome == .close)
        #expect(run.reply.isEmpty)
    }

    @Test(arguments: [UInt32(0), ClientFlags.noZeroes.rawValue])
    func missingFixedNewstyleCloses(_ raw: UInt32) {
        let run = runHandshake(u32(raw) + Client.option(.list))
        #expect(run.outcome == .close)
        #expect(run.reply.isEmpty)
    }

    @Test(arguments: [(ClientFlags.fixedNewstyle, 124), ([.fixedNewstyle, .noZeroes], 0)] as [(ClientFlags, Int)])
    func exportNameReplyPadding(_ flags: ClientFlags, zeroes: Int) {
        let run = runHandshake(Client.flags(flags) + Client.option(.exportName, Array("disk".utf8)))
        let export = Fixtures.disk
        let expected = u64(export.size) + u16(export.transmissionFlags(structuredReplies: false).rawValue)
            + [UInt8](repeating: 0, count: zeroes)
        #expect(run.reply == expected)
        #expect(run.negotiated == Negotiated(export: export, structuredReplies: false, baseAllocation: false))
    }

    @Test func exportNameEmptyIsDefaultExport() {
        let run = runHandshake(hello + Client.option(.exportName))
        #expect(run.negotiated?.export == Fixtures.disk)
        #expect(run.reply == u64(Fixtures.disk.size) + u16(Fixtures.disk.transmissionFlags(structuredReplies: false).rawValue))
    }

    @Test func exportNameSecondExport() {
        let run = runHandshake(hello + Client.option(.exportName, Array("iso".utf8)))
        #expect(run.negotiated?.export == Fixtures.iso)
        #expect(run.reply == u64(Fixtures.iso.size) + u16(Fixtures.iso.transmissionFlags(structuredReplies: false).rawValue))
    }

    @Test(arguments: [Array("nope".utf8), Array("DISK".utf8), [0xFF, 0xFE]])
    func exportNameUnknownCloses(_ name: [UInt8]) {
        let run = runHandshake(hello + Client.option(.exportName, name))
        #expect(run.outcome == .close)
        #expect(run.reply.isEmpty)
    }

    @Test func optionWithBadMagicCloses() {
        var option = Client.option(.list)
        option[0] ^= 0x01
        let run = runHandshake(hello + option)
        #expect(run.outcome == .close)
        #expect(run.reply.isEmpty)
    }

    @Test(arguments: [UInt32(0), 4, 11, 0x7FFF_FFFF])
    func unknownOptionIsUnsupportedAndNextOptionParses(_ code: UInt32) {
        let run = runHandshake(hello + Client.option(code, [1, 2, 3, 4, 5]) + Client.option(.list))
        #expect(run.outcome == .needMore)
        let replies = run.replies
        #expect(replies?.first?.option == code)
        #expect(run.replyTypes == [.errUnsupported, .server, .server, .ack])
    }

    @Test func abortAcksThenCloses() {
        let run = runHandshake(hello + Client.option(.abort) + Client.option(.list))
        #expect(run.outcome == .close)
        #expect(run.reply == OptionReply(.abort, .ack).encoded)
    }

    @Test func abortWithDataStillAcks() {
        let run = runHandshake(hello + Client.option(.abort, [9, 9, 9]))
        #expect(run.outcome == .close)
        #expect(run.reply == OptionReply(.abort, .ack).encoded)
    }

    @Test func listWithoutData() {
        let run = runHandshake(hello + Client.option(.list))
        #expect(run.outcome == .needMore)
        #expect(run.replies == [
            OptionReply(.list, .server, Client.string("disk") + Array("main disk".utf8)),
            OptionReply(.list, .server, Client.string("iso")),
            OptionReply(.list, .ack),
        ])
    }

    @Test func listWithDataIsInvalidAndHandshakeGoesOn() {
        let run = runHandshake(hello + Client.option(.list, [0]) + Client.option(.go, Client.info("")))
        #expect(run.replies?.first?.option == OptionType.list.rawValue)
        #expect(run.replyTypes == [.errInvalid, .info, .info, .ack])
        #expect(run.negotiated?.export == Fixtures.disk)
    }

    @Test func startTLSIsUnsupported() {
        let run = runHandshake(hello + Client.option(.startTLS))
        #expect(run.outcome == .needMore)
        #expect(run.replyTypes == [.errUnsupported])
        #expect(run.replies?.first?.option == OptionType.startTLS.rawValue)
    }

    @Test func optionAtTheLengthLimitIsRead() {
        let data = [UInt8](repeating: 7, count: Handshake.maximumOptionLength)
        let run = runHandshake(hello + Client.option(99, data) + Client.option(.list), chunkSize: { _ in 4000 })
        #expect(run.replyTypes == [.errUnsupported, .server, .server, .ack])
    }

    @Test(arguments: [Int.max, 4096, 999])
    func oversizedOptionIsTooBigAndNextOptionWorks(_ chunk: Int) {
        let data = [UInt8](repeating: 7, count: Handshake.maximumOptionLength + 1)
        // One-byte chunks only near the end, across the discard/next-option boundary.
        let input = hello + Client.option(.list, data) + Client.option(.list)
        let run = runHandshake(input, chunkSize: { $0 < 100 ? 1 : chunk })
        #expect(run.outcome == .needMore)
        #expect(run.fed == input.count)
        #expect(run.replyTypes == [.errTooBig, .server, .server, .ack])
        #expect(run.replies?.first?.option == OptionType.list.rawValue)
    }

    @Test func oversizedExportNameClosesWithoutOptionReply() {
        // EXPORT_NAME has no option-reply framing: any failure must be a hard disconnect.
        let data = [UInt8](repeating: 0x61, count: Handshake.maximumOptionLength + 1)
        let run = runHandshake(hello + Client.option(.exportName, data))
        #expect(run.outcome == .close)
        #expect(run.reply.isEmpty)
    }

    @Test func oversizedAbortStillAcksAndCloses() {
        // ABORT: the server MUST reply ACK and SHOULD ignore any data.
        let data = [UInt8](repeating: 0, count: Handshake.maximumOptionLength + 1)
        let run = runHandshake(hello + Client.option(.abort, data))
        #expect(run.outcome == .close)
        #expect(run.replyTypes == [.ack])
    }

    @Test(arguments: [
        (Script("bad client flags", u32(0x10)), Client.flags() + Client.option(.list)),
        (Script("ABORT", Client.flags() + Client.option(.abort)), Client.option(.list)),
        (Script("unknown EXPORT_NAME", Client.flags() + Client.option(.exportName, [0x78])), Client.option(.list)),
    ])
    func nothingIsEmittedAfterClose(_ input: Script, more: [UInt8]) {
        var run = runHandshake(input.bytes)
        #expect(run.outcome == .close)
        var after: [UInt8] = []
        _ = run.handshake.feed(more, reply: &after)
        #expect(after.isEmpty)
    }
}
