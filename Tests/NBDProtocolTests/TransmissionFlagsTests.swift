import NBDProtocol
import Testing

/// Transmission flags and block-size defaults an export advertises.
@Suite struct TransmissionFlagsTests {
    // HAS_FLAGS 0x1, READ_ONLY 0x2, SEND_FLUSH 0x4, SEND_FUA 0x8, SEND_TRIM 0x20, SEND_WRITE_ZEROES 0x40,
    // SEND_DF 0x80, CAN_MULTI_CONN 0x100, SEND_CACHE 0x400, SEND_FAST_ZERO 0x800.
    @Test(arguments: [
        (false, false, UInt16(0x0D6D)),
        (false, true, 0x0DED),
        (true, false, 0x050F),
        (true, true, 0x058F),
    ])
    func flags(readOnly: Bool, structured: Bool, raw: UInt16) {
        let export = ExportDescription(name: "x", size: 1, readOnly: readOnly)
        #expect(export.transmissionFlags(structuredReplies: structured).rawValue == raw)
        let negotiated = Negotiated(export: export, structuredReplies: structured, baseAllocation: false)
        #expect(negotiated.transmissionFlags.rawValue == raw)
    }

    @Test func blockSizeDefaults() {
        #expect(BlockSizes() == BlockSizes(minimum: 1, preferred: 4096, maximum: 33_554_432))
        #expect(BlockSizes.maximumPayload == 1 << 25)
    }

    @Test(arguments: [false, true])
    func goAdvertisesDFOnlyWithStructuredReplies(_ structured: Bool) {
        let options = structured ? Client.option(.structuredReply) : []
        let run = runHandshake(Client.flags() + options + Client.option(.go, Client.info("iso")))
        let export = run.replies?.first { $0.type == OptionReplyType.info.rawValue }
        let flags = export.map { TransmissionFlags(rawValue: $0.data.loadBigEndian(at: 10)) }
        #expect(flags?.contains(.sendDF) == structured)
        #expect(flags?.contains(.readOnly) == true)
        #expect(flags?.contains(.sendTrim) == false)
    }
}
