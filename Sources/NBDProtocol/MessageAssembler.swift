/// Gathers a fixed-length handshake message that may arrive split across reads.
struct MessageAssembler {
    private var pending: [UInt8] = []

    /// Takes what it still lacks of a `length`-byte message from `input` at
    /// `offset` (advancing it); the whole message once it is complete, else nil.
    mutating func take(_ length: Int, from input: UnsafeRawBufferPointer, at offset: inout Int) -> [UInt8]? {
        let take = min(length - pending.count, input.count - offset)
        if take > 0 {
            pending.append(contentsOf: UnsafeRawBufferPointer(rebasing: input[offset..<offset + take]))
            offset += take
        }
        guard pending.count >= length else { return nil }
        defer { pending.removeAll(keepingCapacity: true) }
        return pending
    }
}
