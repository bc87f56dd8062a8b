import NBDProtocol
import Testing

/// STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT, and what they leave in Negotiated.
@Suite struct MetaContextTests {
    let structured = Client.flags() + Client.option(.structuredReply)

    func metaContext(_ option: OptionType, id: UInt32) -> OptionReply {
        OptionReply(option, .metaContext, u32(id) + Array("base:allocation".utf8))
    }

    func go(_ name: String = "disk") -> [UInt8] { Client.option(.go, Client.info(name)) }

    @Test func structuredReplyAcks() {
        let run = runHandshake(structured + go())
        #expect(run.replies?.first == OptionReply(.structuredReply, .ack))
        #expect(run.negotiated?.structuredReplies == true)
        #expect(run.negotiated?.baseAllocation == false)
    }

    @Test func structuredReplyWithDataIsInvalid() {
        let run = runHandshake(Client.flags() + Client.option(.structuredReply, [0]) + go())
        #expect(run.replyTypes?.first == .errInvalid)
        #expect(run.negotiated?.structuredReplies == false)
    }

    @Test func setBeforeStructuredReplyIsInvalid() {
        let set = Client.option(.setMetaContext, Client.meta("disk", ["base:allocation"]))
        let run = runHandshake(Client.flags() + set + Client.option(.structuredReply) + go())
        #expect(run.replies?.first?.option == OptionType.setMetaContext.rawValue)
        #expect(run.replyTypes?.prefix(2) == [.errInvalid, .ack])
        #expect(run.negotiated?.baseAllocation == false)
    }

    @Test(arguments: [[], ["base:"], ["base:allocation"], ["x:y", "base:allocation"]] as [[String]])
    func listFindsBaseAllocation(_ queries: [String]) {
        let run = runHandshake(structured + Client.option(.listMetaContext, Client.meta("disk", queries)))
        #expect(run.replies?.dropFirst() == [metaContext(.listMetaContext, id: 0), OptionReply(.listMetaContext, .ack)])
    }

    @Test(arguments: [["qemu:dirty-bitmap:b0"], ["base:other"], ["nonsense"]] as [[String]])
    func listIgnoresUnknownQueries(_ queries: [String]) {
        let run = runHandshake(structured + Client.option(.listMetaContext, Client.meta("disk", queries)))
        #expect(run.replies?.dropFirst() == [OptionReply(.listMetaContext, .ack)])
    }

    @Test func listWithoutStructuredReplyIsAllowed() {
        let run = runHandshake(Client.flags() + Client.option(.listMetaContext, Client.meta("", [])))
        #expect(run.replies == [metaContext(.listMetaContext, id: 0), OptionReply(.listMetaContext, .ack)])
    }

    @Test(arguments: [OptionType.listMetaContext, .setMetaContext])
    func unknownExport(_ option: OptionType) {
        let run = runHandshake(structured + Client.option(option, Client.meta("nope", ["base:allocation"])))
        #expect(run.replyTypes == [.ack, .errUnknown])
    }

    static let malformed: [[UInt8]] = [
        [],
        Client.string("disk"),                                        // no query count
        Client.string("disk") + u32(1),                               // one query missing
        Client.string("disk") + u32(1) + u32(20) + Array("base:".utf8), // query past the end
        Client.meta("disk", ["base:allocation"]) + [0],               // trailing byte
    ]

    @Test(arguments: [OptionType.listMetaContext, .setMetaContext], malformed)
    func malformedIsInvalid(_ option: OptionType, data: [UInt8]) {
        let run = runHandshake(structured + Client.option(option, data) + Client.option(.list))
        #expect(run.replyTypes == [.ack, .errInvalid, .server, .server, .ack])
    }

    @Test func setThenGoSelectsBaseAllocation() {
        let set = Client.option(.setMetaContext, Client.meta("disk", ["base:allocation"]))
        let run = runHandshake(structured + set + go())
        #expect(run.replies?[1 ... 2] == [metaContext(.setMetaContext, id: MetaContext.baseAllocationID),
                                          OptionReply(.setMetaContext, .ack)])
        #expect(run.negotiated == Negotiated(export: Fixtures.disk, structuredReplies: true, baseAllocation: true))
    }

    @Test func setOnDefaultNameThenGoByName() {
        let set = Client.option(.setMetaContext, Client.meta("", ["base:allocation"]))
        #expect(runHandshake(structured + set + go("disk")).negotiated?.baseAllocation == true)
    }

    @Test func setThenExportNameSelectsBaseAllocation() {
        let set = Client.option(.setMetaContext, Client.meta("iso", ["base:allocation"]))
        let run = runHandshake(structured + set + Client.option(.exportName, Array("iso".utf8)))
        #expect(run.negotiated?.baseAllocation == true)
    }

    @Test func setForAnotherExportDoesNotCarryOver() {
        let set = Client.option(.setMetaContext, Client.meta("iso", ["base:allocation"]))
        #expect(runHandshake(structured + set + go("disk")).negotiated?.baseAllocation == false)
    }

    @Test(arguments: [
        Client.meta("disk", []),                                  // zero queries select nothing
        Client.meta("disk", ["base:"]),                           // SET ignores the wildcard
        Client.meta("disk", ["base:other"]),
        Client.meta("disk", ["base:allocation"]) + [0],           // a failed SET clears too
    ])
    func laterSetReplacesSelection(_ second: [UInt8]) {
        let first = Client.option(.setMetaContext, Client.meta("disk", ["base:allocation"]))
        let run = runHandshake(structured + first + Client.option(.setMetaContext, second) + go())
        #expect(run.replies?[3].option == OptionType.setMetaContext.rawValue)
        #expect(run.replies?[3].type != OptionReplyType.metaContext.rawValue)
        #expect(run.negotiated?.structuredReplies == true)
        #expect(run.negotiated?.baseAllocation == false)
    }

    // MARK: - Contexts besides base:allocation

    static let snapshot = ExportDescription(name: "snap", size: 1 << 20, readOnly: true, metaContexts: [
        MetaContextOffer(name: "keel:changed:s1", id: 7), MetaContextOffer(name: "keel:changed:s2", id: 9),
    ])

    func offered(_ option: OptionType, _ name: String, id: UInt32) -> OptionReply {
        OptionReply(option, .metaContext, u32(id) + Array(name.utf8))
    }

    @Test(arguments: [[], ["keel:"], ["keel:changed:"]] as [[String]])
    func listShowsAnExportsOtherContextsByNamespace(_ queries: [String]) {
        let run = runHandshake(structured + Client.option(.listMetaContext, Client.meta("snap", queries)),
                               exports: [Self.snapshot])
        let expected = (queries.isEmpty ? [metaContext(.listMetaContext, id: 0)] : [])
            + [offered(.listMetaContext, "keel:changed:s1", id: 0), offered(.listMetaContext, "keel:changed:s2", id: 0)]
        #expect(run.replies?.dropFirst().dropLast() == expected[...])
    }

    @Test func setSelectsBaseAllocationAndTheFirstOtherContextAsked() {
        let set = Client.option(.setMetaContext, Client.meta("snap", ["keel:changed:s2", "base:allocation", "keel:changed:s1"]))
        let run = runHandshake(structured + set + go("snap"), exports: [Self.snapshot])
        #expect(run.replies?[1 ... 3] == [metaContext(.setMetaContext, id: MetaContext.baseAllocationID),
                                          offered(.setMetaContext, "keel:changed:s2", id: 9),
                                          OptionReply(.setMetaContext, .ack)])
        #expect(run.negotiated?.baseAllocation == true)
        #expect(run.negotiated?.extraContext == MetaContextOffer(name: "keel:changed:s2", id: 9))
    }

    @Test func setOfAnotherContextAloneAllowsBlockStatus() {
        let set = Client.option(.setMetaContext, Client.meta("snap", ["keel:changed:s1"]))
        let run = runHandshake(structured + set + go("snap"), exports: [Self.snapshot])
        #expect(run.negotiated?.baseAllocation == false)
        #expect(run.negotiated?.answersBlockStatus == true)
    }

    @Test func setOfANamespaceSelectsNothing() {
        let set = Client.option(.setMetaContext, Client.meta("snap", ["keel:"]))
        let run = runHandshake(structured + set + go("snap"), exports: [Self.snapshot])
        #expect(run.replies?[1] == OptionReply(.setMetaContext, .ack))
        #expect(run.negotiated?.answersBlockStatus == false)
    }
}
