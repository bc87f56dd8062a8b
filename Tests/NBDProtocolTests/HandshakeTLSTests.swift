import NBDProtocol
import Testing

/// STARTTLS and the TLS policies: what a server offering or requiring TLS
/// answers before and after the client starts it.
@Suite struct HandshakeTLSTests {
    func run(_ input: [UInt8], tls: Handshake.TLSPolicy) -> (step: Handshake.Step, replies: [OptionReply], handshake: Handshake) {
        var handshake = Handshake(catalog: StaticExports(Fixtures.exports), tls: tls)
        var reply: [UInt8] = []
        let step = handshake.feed(input, reply: &reply)
        return (step, OptionReply.decode(reply) ?? [], handshake)
    }

    @Test func withTLSOffStartTLSIsUnsupported() {
        let result = run(Client.flags() + Client.option(.startTLS), tls: .off)
        #expect(result.step == .needMore)
        #expect(result.replies.map(\.type) == [OptionReplyType.errUnsupported.rawValue])
    }

    @Test func requireRefusesEveryOptionButStartTLSAndAbort() {
        let options = Client.option(.list) + Client.option(.structuredReply) + Client.option(.info, Client.info("disk"))
            + Client.option(.go, Client.info("disk")) + Client.option(.listMetaContext, Client.meta("disk", []))
            + Client.option(99)
        let result = run(Client.flags() + options, tls: .require)
        #expect(result.step == .needMore)
        #expect(result.replies.map(\.type) == Array(repeating: OptionReplyType.errTLSRequired.rawValue, count: 6))
        #expect(!result.replies.contains { $0.data.contains(contentsOf: Array("disk".utf8)) }, "an export named before TLS")
    }

    @Test func requireClosesOnExportName() {
        let result = run(Client.flags() + Client.option(.exportName, Array("disk".utf8)), tls: .require)
        #expect(result.step == .close(reason: "EXPORT_NAME without TLS, which this server requires"))
    }

    @Test func requireStillAcknowledgesAbort() {
        let result = run(Client.flags() + Client.option(.abort), tls: .require)
        #expect(result.replies == [OptionReply(.abort, .ack)])
    }

    @Test func startTLSIsAcknowledgedAndTheRestIsTheSessions() {
        let input = Client.flags() + Client.option(.startTLS) + [0x16, 0x03, 0x01]
        let result = run(input, tls: .require)
        #expect(result.step == .startTLS(consumed: input.count - 3))
        #expect(result.replies == [OptionReply(.startTLS, .ack)])
    }

    @Test func insideTLSOptionsAreServedAndAStructuredReplyBeforeItIsForgotten() {
        var result = run(Client.flags() + Client.option(.structuredReply) + Client.option(.startTLS), tls: .on)
        #expect(result.step == .startTLS(consumed: 4 + 16 + 16))
        var reply: [UInt8] = []
        let step = result.handshake.feed(Client.option(.startTLS) + Client.option(.go, Client.info("disk")), reply: &reply)
        guard case .finished(let negotiated, _) = step else { Issue.record("\(step)"); return }
        #expect(!negotiated.structuredReplies)
        let replies = OptionReply.decode(reply) ?? []
        #expect(replies.first == OptionReply(.startTLS, .errInvalid, Array("TLS is already started".utf8)))
        #expect(replies.last == OptionReply(.go, .ack))
    }

    @Test func startTLSWithDataIsInvalid() {
        let result = run(Client.flags() + Client.option(.startTLS, [0]), tls: .on)
        #expect(result.step == .needMore)
        #expect(result.replies.map(\.type) == [OptionReplyType.errInvalid.rawValue])
    }

    @Test func withTLSOnPlaintextClientsAreStillServed() {
        let result = run(Client.flags() + Client.option(.go, Client.info("disk")), tls: .on)
        guard case .finished = result.step else { Issue.record("\(result.step)"); return }
    }
}

extension Array where Element == UInt8 {
    func contains(contentsOf needle: [UInt8]) -> Bool {
        guard needle.count <= count else { return false }
        return (0...(count - needle.count)).contains { Array(self[$0..<$0 + needle.count]) == needle }
    }
}
