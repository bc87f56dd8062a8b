/// Encoders for transmission replies. They write headers into memory the
/// caller owns (a request slot) so that replies cost no allocation.
public enum Reply {
    public static let simpleHeaderSize = 16
    public static let chunkHeaderSize = 20
    /// The largest header Keel writes: a chunk header plus an OFFSET_DATA offset.
    public static let maximumHeaderSize = 32

    /// Simple reply: magic, error, handle.
    @inlinable
    public static func writeSimple(to p: UnsafeMutableRawPointer, handle: UInt64, error: NBDError?) -> Int {
        p.storeBigEndian(NBDMagic.simpleReply, at: 0)
        p.storeBigEndian(error?.rawValue ?? 0, at: 4)
        p.storeBigEndian(handle, at: 8)
        return simpleHeaderSize
    }

    @inlinable
    public static func writeChunkHeader(to p: UnsafeMutableRawPointer, handle: UInt64, type: ReplyChunkType,
                                        flags: ReplyFlags = .done, payloadLength: UInt32) -> Int {
        p.storeBigEndian(NBDMagic.structuredReply, at: 0)
        p.storeBigEndian(flags.rawValue, at: 4)
        p.storeBigEndian(type.rawValue, at: 6)
        p.storeBigEndian(handle, at: 8)
        p.storeBigEndian(payloadLength, at: 16)
        return chunkHeaderSize
    }

    /// OFFSET_DATA chunk header (DONE): the caller sends `dataLength` bytes after it.
    @inlinable
    public static func writeOffsetData(to p: UnsafeMutableRawPointer, handle: UInt64, offset: UInt64,
                                       dataLength: UInt32) -> Int {
        _ = writeChunkHeader(to: p, handle: handle, type: .offsetData, payloadLength: 8 + dataLength)
        p.storeBigEndian(offset, at: chunkHeaderSize)
        return chunkHeaderSize + 8
    }

    /// ERROR chunk (DONE) with no message.
    @inlinable
    public static func writeErrorChunk(to p: UnsafeMutableRawPointer, handle: UInt64, error: NBDError) -> Int {
        _ = writeChunkHeader(to: p, handle: handle, type: .error, payloadLength: 6)
        p.storeBigEndian(error.rawValue, at: chunkHeaderSize)
        p.storeBigEndian(UInt16(0), at: chunkHeaderSize + 4)
        return chunkHeaderSize + 6
    }

    /// The header of a reply without data: a simple reply, or with structured
    /// replies an ERROR chunk for failures and NONE for a successful zero-length READ.
    @inlinable
    public static func writeStatus(to p: UnsafeMutableRawPointer, handle: UInt64, error: NBDError?,
                                   structured: Bool, isRead: Bool) -> Int {
        guard structured else { return writeSimple(to: p, handle: handle, error: error) }
        if let error { return writeErrorChunk(to: p, handle: handle, error: error) }
        if isRead { return writeChunkHeader(to: p, handle: handle, type: .none, payloadLength: 0) }
        return writeSimple(to: p, handle: handle, error: nil)
    }

    /// A BLOCK_STATUS chunk's header and context id, for the descriptors
    /// the caller places after it (8 bytes each); the last chunk is `done`.
    @inlinable
    public static func writeBlockStatusHeader(to p: UnsafeMutableRawPointer, handle: UInt64,
                                              context: UInt32 = MetaContext.baseAllocationID,
                                              descriptors: Int, done: Bool = true) -> Int {
        _ = writeChunkHeader(to: p, handle: handle, type: .blockStatus, flags: done ? .done : [],
                             payloadLength: UInt32(4 + 8 * descriptors))
        p.storeBigEndian(context, at: chunkHeaderSize)
        return blockStatusHeaderSize
    }

    public static let blockStatusHeaderSize = chunkHeaderSize + 4
}
