import NBDProtocol
import Testing

/// The device frontend's half of the handshake, run against the server's
/// state machine byte for byte (no socket), and against bad servers.
@Suite struct ClientHandshakeTests {
    /// Client and server in lockstep until one of them stops; the server's
    /// input is whatever the client sent, one byte at a time when `trickle`.
    struct Conversation {
        var client: ClientHandshake
        var server: Handshake
        var clientStep = ClientHandshake.Step.needMore
        var serverStep = Handshake.Step.needMore

        init(export: String, startTLS: Bool = false, tls: Handshake.TLSPolicy = .off) {
            client = ClientHandshake(exportName: export, startTLS: startTLS)
            server = Handshake(catalog: StaticExports(Fixtures.exports), tls: tls)
        }

        mutating func run(trickle: Bool = false) {
            var toServer: [UInt8] = []
            clientStep = deliver(Handshake.greeting, trickle: trickle, to: &client, sending: &toServer)
            for _ in 0..<16 where clientStep == .needMore && !toServer.isEmpty {
                var toClient: [UInt8] = []
                serverStep = server.feed(toServer, reply: &toClient)
                toServer = []
                clientStep = deliver(toClient, trickle: trickle, to: &client, sending: &toServer)
                if case .close = serverStep { break }
            }
        }

        private func deliver(_ bytes: [UInt8], trickle: Bool, to client: inout ClientHandshake,
                             sending: inout [UInt8]) -> ClientHandshake.Step {
            guard trickle else { return bytes.withUnsafeBytes { client.receive($0, send: &sending) } }
            var step = ClientHandshake.Step.needMore
            for byte in bytes where step == .needMore {
                step = [byte].withUnsafeBytes { client.receive($0, send: &sending) }
            }
            return step
        }
    }

    @Test(arguments: [false, true]) func goFinishesWithTheExportsSizeAndFlags(trickle: Bool) {
        var conversation = Conversation(export: "iso")
        conversation.run(trickle: trickle)
        let expected = Fixtures.iso.transmissionFlags(structuredReplies: false)
        guard case .finished(let size, let flags, let consumed) = conversation.clientStep else {
            Issue.record("\(conversation.clientStep)"); return
        }
        #expect(size == Fixtures.iso.size && flags == expected)
        #expect(trickle ? consumed == 1 : consumed > 20, "every byte of the last input was the handshake's")
        guard case .finished(let negotiated, _) = conversation.serverStep else { Issue.record("\(conversation.serverStep)"); return }
        #expect(!negotiated.structuredReplies, "the kernel reads simple replies only")
        #expect(negotiated.export.name == "iso")
    }

    @Test func anUnknownExportFailsWithTheServersWords() {
        var conversation = Conversation(export: "nope")
        conversation.run()
        guard case .failed(let reason) = conversation.clientStep else { Issue.record("\(conversation.clientStep)"); return }
        #expect(reason.contains("refused the export 'nope'"))
    }

    @Test func aServerThatRequiresTLSIsNamedAsSuch() {
        var conversation = Conversation(export: "disk", tls: .require)
        conversation.run()
        guard case .failed(let reason) = conversation.clientStep else { Issue.record("\(conversation.clientStep)"); return }
        #expect(reason.contains("errTLSRequired"))
    }

    @Test func startTLSThenGoInsideTheSession() {
        var conversation = Conversation(export: "disk", startTLS: true, tls: .require)
        conversation.run()
        #expect(conversation.clientStep == .startTLS(consumed: 20))
        #expect(conversation.serverStep == .startTLS(consumed: 20))
        var toServer: [UInt8] = []
        conversation.client.resumeInsideTLS(send: &toServer)
        var toClient: [UInt8] = []
        let serverStep = conversation.server.feed(toServer, reply: &toClient)
        guard case .finished = serverStep else { Issue.record("\(serverStep)"); return }
        var none: [UInt8] = []
        let step = toClient.withUnsafeBytes { conversation.client.receive($0, send: &none) }
        #expect(step == .finished(size: Fixtures.disk.size, flags: Fixtures.disk.transmissionFlags(structuredReplies: false),
                                  consumed: toClient.count))
        #expect(none.isEmpty)
    }

    @Test func startTLSRefusedByAServerWithoutIt() {
        var conversation = Conversation(export: "disk", startTLS: true, tls: .off)
        conversation.run()
        guard case .failed(let reason) = conversation.clientStep else { Issue.record("\(conversation.clientStep)"); return }
        #expect(reason.contains("refused STARTTLS"))
    }

    @Test func oldstyleAndGarbageGreetingsFail() {
        var client = ClientHandshake(exportName: "disk")
        var send: [UInt8] = []
        let oldstyle = u64(NBDMagic.initPassword) + u64(0x0000_4202_8186_1253) + u16(0)
        let step = oldstyle.withUnsafeBytes { client.receive($0, send: &send) }
        #expect(step == .failed("the server does not speak newstyle NBD"))
        #expect(send.isEmpty)
    }

    @Test func anOversizedOptionReplyFails() {
        var client = ClientHandshake(exportName: "disk")
        var send: [UInt8] = []
        _ = Handshake.greeting.withUnsafeBytes { client.receive($0, send: &send) }
        let reply = u64(NBDMagic.optionReply) + u32(OptionType.go.rawValue) + u32(OptionReplyType.info.rawValue) + u32(1 << 20)
        let step = reply.withUnsafeBytes { client.receive($0, send: &send) }
        #expect(step == .failed("an option reply of 1048576 bytes"))
    }

    @Test func anAckWithoutTheExportInfoFails() {
        var client = ClientHandshake(exportName: "disk")
        var send: [UInt8] = []
        _ = Handshake.greeting.withUnsafeBytes { client.receive($0, send: &send) }
        let ack = u64(NBDMagic.optionReply) + u32(OptionType.go.rawValue) + u32(OptionReplyType.ack.rawValue) + u32(0)
        let step = ack.withUnsafeBytes { client.receive($0, send: &send) }
        #expect(step == .failed("the server accepted GO without saying the export's size"))
    }
}
