import NBDProtocol
import Testing

/// RequestParser: header decoding and WRITE payload framing across arbitrary chunks.
@Suite struct RequestParserTests {
    static let read = RequestHeader(type: .read, flags: .fua, handle: 0x0102_0304_0506_0708,
                                    offset: 0x1122_3344_5566_7788, length: 0x0001_0000)
    static let write = RequestHeader(type: .write, handle: 9, offset: 4096, length: 10)
    static let payload: [UInt8] = Array(0 ..< 10)
    static let flush = RequestHeader(type: .flush, handle: 10, offset: 0, length: 0)

    @Test func headerWireLayout() {
        #expect(Self.read.encoded == [
            0x25, 0x60, 0x95, 0x13,                          // magic
            0x00, 0x01,                                      // flags: FUA
            0x00, 0x00,                                      // type: READ
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,  // handle
            0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,  // offset
            0x00, 0x01, 0x00, 0x00,                          // length
        ])
    }

    @Test func decodesHeader() {
        var parser = RequestParser()
        #expect(parse(Self.read.encoded, with: &parser) == [.header(Self.read)])
        #expect(!parser.inPayload)
        #expect(Self.read.command == .read)
        #expect(Self.read.commandFlags == .fua)
    }

    @Test(arguments: 1 ..< RequestHeader.size)
    func headerSplitAt(_ split: Int) {
        let bytes = Self.read.encoded + Self.flush.encoded
        var parser = RequestParser()
        #expect(parse(Array(bytes[..<split]), with: &parser).isEmpty)
        #expect(parse(Array(bytes[split...]), with: &parser) == [.header(Self.read), .header(Self.flush)])
    }

    @Test func headerInOneByteChunks() {
        var parser = RequestParser()
        var events: [ParsedEvent] = []
        for byte in Self.write.encoded + Self.payload + Self.flush.encoded {
            events += parse([byte], with: &parser)
        }
        #expect(coalesced(events) == [.header(Self.write), .payload(Self.payload, isLast: true), .header(Self.flush)])
        #expect(events.count == 2 + Self.payload.count)
    }

    @Test func writePayloadInOneChunk() {
        var parser = RequestParser()
        let events = parse(Self.write.encoded + Self.payload + Self.flush.encoded, with: &parser)
        #expect(events == [.header(Self.write), .payload(Self.payload, isLast: true), .header(Self.flush)])
    }

    @Test(arguments: [[3, 7], [1, 1, 8], [9, 1], [10]])
    func writePayloadAcrossChunks(_ sizes: [Int]) {
        var parser = RequestParser()
        #expect(parse(Self.write.encoded, with: &parser) == [.header(Self.write)])
        var offset = 0
        for (index, size) in sizes.enumerated() {
            #expect(parser.inPayload)
            let piece = Array(Self.payload[offset ..< offset + size])
            offset += size
            #expect(parse(piece, with: &parser) == [.payload(piece, isLast: index == sizes.count - 1)])
        }
        #expect(!parser.inPayload)
        #expect(parse(Self.flush.encoded, with: &parser) == [.header(Self.flush)])
    }

    @Test func emptyInputInsidePayloadGivesNothing() {
        var parser = RequestParser()
        _ = parse(Self.write.encoded, with: &parser)
        #expect(parse([], with: &parser).isEmpty)
        #expect(parser.inPayload)
    }

    @Test func zeroLengthWriteHasNoPayload() {
        let empty = RequestHeader(type: .write, handle: 1, offset: 0, length: 0)
        var parser = RequestParser()
        #expect(parse(empty.encoded + Self.flush.encoded, with: &parser) == [.header(empty), .header(Self.flush)])
    }

    @Test(arguments: [UInt16(0), 2, 3, 4, 5, 6, 7, 8, 0xFFFF])
    func onlyWriteCarriesPayload(_ type: UInt16) {
        let header = RequestHeader(flags: 0, type: type, handle: 5, offset: 0, length: 4096)
        #expect(header.payloadLength == 0)
        var parser = RequestParser()
        #expect(parse(header.encoded + Self.flush.encoded, with: &parser) == [.header(header), .header(Self.flush)])
    }

    @Test(arguments: [UInt32(0x2560_9514), 0x6744_6698, 0, 0xFFFF_FFFF])
    func badMagic(_ magic: UInt32) {
        let bytes = u32(magic) + Self.read.encoded.dropFirst(4)
        var whole = RequestParser()
        #expect(parse(bytes, with: &whole) == [.badMagic(magic)])
        var split = RequestParser()
        #expect(parse(Array(bytes[..<5]), with: &split).isEmpty)
        #expect(parse(Array(bytes[5...]), with: &split) == [.badMagic(magic)])
    }

    @Test func badMagicAfterGoodRequest() {
        var bytes = Self.flush.encoded + Self.flush.encoded
        bytes[RequestHeader.size] = 0
        var parser = RequestParser()
        #expect(parse(bytes, with: &parser) == [.header(Self.flush), .badMagic(0x0060_9513)])
    }
}
