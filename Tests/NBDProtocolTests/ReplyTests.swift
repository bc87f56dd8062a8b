import NBDProtocol
import Testing

/// Transmission reply encoders: exact bytes, and nothing written past the returned size.
@Suite struct ReplyTests {
    static let handle: UInt64 = 0x0102_0304_0506_0708
    static let handleBytes: [UInt8] = [1, 2, 3, 4, 5, 6, 7, 8]
    static let simpleMagic: [UInt8] = [0x67, 0x44, 0x66, 0x98]
    static let chunkMagic: [UInt8] = [0x66, 0x8e, 0x33, 0xef]

    /// Runs an encoder over a buffer of 0xAA and returns the bytes it claims to have written.
    func encode(_ write: (UnsafeMutableRawPointer) -> Int) -> [UInt8] {
        var buffer = [UInt8](repeating: 0xAA, count: Reply.maximumHeaderSize + 8)
        let written = buffer.withUnsafeMutableBytes { write($0.baseAddress!) }
        #expect(written <= Reply.maximumHeaderSize)
        #expect(buffer[written...].allSatisfy { $0 == 0xAA }, "wrote past the returned size \(written)")
        return Array(buffer[..<written])
    }

    @Test func simpleSuccess() {
        let bytes = encode { Reply.writeSimple(to: $0, handle: Self.handle, error: nil) }
        #expect(bytes == Self.simpleMagic + [0, 0, 0, 0] + Self.handleBytes)
    }

    @Test func simpleError() {
        let bytes = encode { Reply.writeSimple(to: $0, handle: Self.handle, error: .noSpace) }
        #expect(bytes == Self.simpleMagic + [0, 0, 0, 28] + Self.handleBytes)
    }

    @Test func offsetDataHeader() {
        let bytes = encode {
            Reply.writeOffsetData(to: $0, handle: Self.handle, offset: 0x1000_0000_0000_2000, dataLength: 0x10000)
        }
        #expect(bytes == Self.chunkMagic + [0, 1, 0, 1] + Self.handleBytes
                + [0x00, 0x01, 0x00, 0x08]                          // 8 + data length
                + [0x10, 0, 0, 0, 0, 0, 0x20, 0x00])                // offset
    }

    @Test func errorChunk() {
        let bytes = encode { Reply.writeErrorChunk(to: $0, handle: Self.handle, error: .invalid) }
        #expect(bytes == Self.chunkMagic + [0, 1, 0x80, 0x01] + Self.handleBytes
                + [0, 0, 0, 6] + [0, 0, 0, 22] + [0, 0])
    }

    @Test func statusStructuredReadSuccessIsNoneChunk() {
        let bytes = encode { Reply.writeStatus(to: $0, handle: Self.handle, error: nil, structured: true, isRead: true) }
        #expect(bytes == Self.chunkMagic + [0, 1, 0, 0] + Self.handleBytes + [0, 0, 0, 0])
    }

    @Test(arguments: [true, false])
    func statusStructuredErrorIsErrorChunk(_ isRead: Bool) {
        let bytes = encode {
            Reply.writeStatus(to: $0, handle: Self.handle, error: .permission, structured: true, isRead: isRead)
        }
        #expect(bytes == encode { Reply.writeErrorChunk(to: $0, handle: Self.handle, error: .permission) })
    }

    @Test func statusStructuredNonReadSuccessIsSimple() {
        let bytes = encode { Reply.writeStatus(to: $0, handle: Self.handle, error: nil, structured: true, isRead: false) }
        #expect(bytes == Self.simpleMagic + [0, 0, 0, 0] + Self.handleBytes)
    }

    @Test(arguments: [(nil, true), (nil, false), (NBDError.io, true), (.io, false)] as [(NBDError?, Bool)])
    func statusWithoutStructuredIsSimple(_ error: NBDError?, _ isRead: Bool) {
        let bytes = encode { Reply.writeStatus(to: $0, handle: Self.handle, error: error, structured: false, isRead: isRead) }
        #expect(bytes == encode { Reply.writeSimple(to: $0, handle: Self.handle, error: error) })
    }

    @Test(arguments: [1, 3, 1000])
    func blockStatusHeader(_ descriptors: Int) {
        let bytes = encode { Reply.writeBlockStatusHeader(to: $0, handle: Self.handle, descriptors: descriptors) }
        #expect(bytes == Self.chunkMagic + [0, 1, 0, 5] + Self.handleBytes
                + u32(UInt32(4 + 8 * descriptors)) + u32(MetaContext.baseAllocationID))
    }

    @Test func chunkHeaderWithoutDone() {
        let bytes = encode {
            Reply.writeChunkHeader(to: $0, handle: Self.handle, type: .offsetHole, flags: [], payloadLength: 12)
        }
        #expect(bytes == Self.chunkMagic + [0, 0, 0, 2] + Self.handleBytes + [0, 0, 0, 12])
    }
}
