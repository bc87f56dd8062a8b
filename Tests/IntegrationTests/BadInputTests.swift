import Foundation
import LibNBD
import NBDProtocol
import Testing

/// Malformed or hostile traffic gets an NBD error reply or a clean close,
/// never a crash, a hang, or a write outside the export.
@Suite(.serialized) struct BadInputTests {
    let scratch: Scratch
    let image: String
    let server: KeelServer
    static let size: UInt64 = 1 << 20

    init() throws {
        scratch = try Scratch()
        image = try scratch.image(size: Int(Self.size))
        server = try KeelServer(image: image, scratch: scratch)
    }

    /// After each test: still serving, file size unchanged, clean exit.
    private func expectServerHealthy() throws {
        let client = try NBDClient()
        try client.connect(uri: server.uri)
        #expect(try client.size == Self.size)
        try client.shutdown()
        #expect(server.stop() == 0)
        let attributes = try FileManager.default.attributesOfItem(atPath: image)
        #expect(attributes[.size] as? UInt64 == Self.size)
    }

    private func uncheckedClient() throws -> NBDClient {
        let client = try NBDClient()
        try client.disableClientSideChecks()
        try client.connect(uri: server.uri)
        return client
    }

    private func expectError(_ errno: Int32, _ body: () throws -> Void) {
        do {
            try body()
            Issue.record("expected errno \(errno), got success")
        } catch let error as NBDClientError {
            #expect(error.errno == errno, "\(error.message)")
        } catch {
            Issue.record("unexpected \(error)")
        }
    }

    @Test func outOfRangeRequestsGetEINVALOrENOSPC() throws {
        let client = try uncheckedClient()
        expectError(EINVAL) { _ = try client.read(count: 4096, at: Self.size - 100) }
        expectError(ENOSPC) { try client.write([UInt8](repeating: 1, count: 4096), at: Self.size - 100) }
        expectError(ENOSPC) { try client.write([1], at: Self.size) }
        expectError(EINVAL) { try client.trim(count: 8192, at: Self.size - 4096) }
        expectError(ENOSPC) { try client.zero(count: 8192, at: Self.size - 4096) }
        expectError(EINVAL) { try client.cache(count: 8192, at: Self.size) }
        expectError(EINVAL) { _ = try client.read(count: 1, at: UInt64.max - 1) }
        // Still in sync after the errors.
        try client.write([7, 7, 7], at: 10)
        #expect(try client.read(count: 3, at: 10) == [7, 7, 7])
        try expectServerHealthy()
    }

    @Test func oversizedReadGetsEINVALAndOversizedWriteClosesTheConnection() throws {
        let client = try uncheckedClient()
        expectError(EINVAL) { _ = try client.read(count: (32 << 20) + 1, at: 0) }

        let raw = try RawClient(server.address)
        try raw.enterTransmission()
        try raw.sendRequest(RequestHeader(type: .write, handle: 1, offset: 0, length: (64 << 20)))
        try? raw.send([UInt8](repeating: 0xAB, count: 4096))   // the server may already be gone
        #expect(raw.isClosedByServer())
        try expectServerHealthy()
    }

    @Test func readOnlyExportRefusesChangesWithEPERM() throws {
        server.stop()
        let readOnly = try KeelServer(image: image, scratch: scratch, extra: ["--read-only"])
        let client = try NBDClient()
        try client.disableClientSideChecks()
        try client.connect(uri: readOnly.uri)
        #expect(client.isReadOnly)
        expectError(EPERM) { try client.write([1, 2, 3], at: 0) }
        expectError(EPERM) { try client.trim(count: 4096, at: 0) }
        expectError(EPERM) { try client.zero(count: 4096, at: 0) }
        #expect(try client.read(count: 3, at: 0) == [0, 0, 0])
        try client.flush()
        #expect(readOnly.stop() == 0)
    }

    @Test func unknownCommandAndBadFlagsGetEINVAL() throws {
        let raw = try RawClient(server.address)
        try raw.enterTransmission()
        try raw.sendRequest(RequestHeader(flags: 0, type: 42, handle: 7, offset: 0, length: 0))
        #expect(try raw.receiveSimpleReply()! == (NBDError.invalid.rawValue, 7))
        try raw.sendRequest(RequestHeader(flags: 0x8000, type: 0, handle: 8, offset: 0, length: 512))
        #expect(try raw.receiveSimpleReply()! == (NBDError.invalid.rawValue, 8))
        // BLOCK_STATUS without a negotiated meta context.
        try raw.sendRequest(RequestHeader(type: .blockStatus, handle: 9, offset: 0, length: 512))
        #expect(try raw.receiveSimpleReply()! == (NBDError.invalid.rawValue, 9))
        // A WRITE refused for its range still has its payload consumed.
        try raw.sendRequest(RequestHeader(type: .write, handle: 10, offset: Self.size, length: 100),
                            payload: [UInt8](repeating: 9, count: 100))
        #expect(try raw.receiveSimpleReply()! == (NBDError.noSpace.rawValue, 10))
        try raw.sendRequest(RequestHeader(type: .flush, handle: 11, offset: 0, length: 0))
        #expect(try raw.receiveSimpleReply()! == (0, 11))
        try expectServerHealthy()
    }

    @Test func badRequestMagicClosesTheConnection() throws {
        let raw = try RawClient(server.address)
        try raw.enterTransmission()
        try raw.send([UInt8](repeating: 0x55, count: 28))
        #expect(raw.isClosedByServer())
        try expectServerHealthy()
    }

    @Test func handshakeViolationsCloseTheConnection() throws {
        // Unknown client flags.
        var raw = try RawClient(server.address)
        try raw.greet(flags: 0x80)
        #expect(raw.isClosedByServer())
        // Bad option magic.
        raw = try RawClient(server.address)
        try raw.greet()
        try raw.send([UInt8](repeating: 0x11, count: 16))
        #expect(raw.isClosedByServer())
        // EXPORT_NAME of an unknown export.
        raw = try RawClient(server.address)
        try raw.greet()
        try raw.sendOption(OptionType.exportName.rawValue, Array("nope".utf8))
        #expect(raw.isClosedByServer())
        try expectServerHealthy()
    }

    @Test func unknownAndOversizedOptionsAreAnsweredAndNegotiationGoesOn() throws {
        let raw = try RawClient(server.address)
        try raw.greet()
        try raw.sendOption(99, [1, 2, 3])
        #expect(try raw.receiveOptionReply()?.0 == OptionReplyType.errUnsupported.rawValue)
        try raw.sendOption(OptionType.list.rawValue, [UInt8](repeating: 0, count: 100_000))
        #expect(try raw.receiveOptionReply()?.0 == OptionReplyType.errTooBig.rawValue)
        try raw.sendOption(OptionType.go.rawValue, [0, 0, 0, 9])   // name length past the data
        #expect(try raw.receiveOptionReply()?.0 == OptionReplyType.errInvalid.rawValue)
        try raw.sendOption(OptionType.list.rawValue)
        #expect(try raw.receiveOptionReply()?.0 == OptionReplyType.server.rawValue)
        #expect(try raw.receiveOptionReply()?.0 == OptionReplyType.ack.rawValue)
        try raw.sendOption(OptionType.abort.rawValue)
        #expect(try raw.receiveOptionReply()?.0 == OptionReplyType.ack.rawValue)
        #expect(raw.isClosedByServer())
        try expectServerHealthy()
    }

    /// Defect (resources): a client that pipelined options and never read the
    /// replies made the server keep them all; past 1 MiB unread it is closed.
    @Test func aClientThatNeverReadsItsHandshakeRepliesIsClosed() throws {
        let client = try RawClient(server.address)
        try client.greet()
        var sent = 0
        do {
            for _ in 0..<400_000 {
                try client.sendOption(3 /* NBD_OPT_LIST */)
                sent += 1
            }
        } catch {}
        #expect(sent < 400_000, "the server kept reading and answering without end")
        #expect(client.isClosedByServer())
        let info = try run(["nbdinfo", "--size", server.uri])
        #expect(info.status == 0, "the server still serves others: \(info.stderr)")
    }

    @Test func clientsVanishingMidRequestDoNotHurtTheServer() throws {
        for cut in [5, 18, 30] {
            let raw = try RawClient(server.address)
            try raw.greet()
            try raw.sendOption(OptionType.exportName.rawValue)
            _ = try raw.receive(10)
            var bytes = RequestHeader(type: .write, handle: 1, offset: 0, length: 4096).encoded
            bytes += [UInt8](repeating: 1, count: 4096)
            try raw.send(Array(bytes.prefix(cut)))
        }
        // Many reads in flight, then gone before the replies.
        let raw = try RawClient(server.address)
        try raw.enterTransmission()
        for h in 0..<64 { try raw.sendRequest(RequestHeader(type: .read, handle: UInt64(h), offset: 0, length: 65536)) }
        try expectServerHealthy()
    }

    @Test func disconnectFinishesInFlightRequestsFirst() throws {
        let raw = try RawClient(server.address)
        try raw.enterTransmission()
        for h in 0..<8 {
            try raw.sendRequest(RequestHeader(type: .write, flags: .fua, handle: UInt64(h), offset: UInt64(h) * 4096, length: 4096),
                                payload: [UInt8](repeating: UInt8(h + 1), count: 4096))
        }
        try raw.sendRequest(RequestHeader(type: .disconnect, handle: 99, offset: 0, length: 0))
        var handles: Set<UInt64> = []
        for _ in 0..<8 {
            guard let (error, handle) = try raw.receiveSimpleReply() else { break }
            #expect(error == 0)
            handles.insert(handle)
        }
        #expect(handles == Set(0..<8))
        #expect(raw.isClosedByServer())
        let data = try Data(contentsOf: URL(fileURLWithPath: image))
        for h in 0..<8 { #expect(data[h * 4096 + 100] == UInt8(h + 1)) }
        try expectServerHealthy()
    }
}
