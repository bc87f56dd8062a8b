import NBDProtocol

/// Plays one whole client byte stream (options, then requests) through the
/// server's protocol state machines: `Handshake`, then `RequestParser` and
/// `RequestPolicy`. The bytes arrive in chunks whose sizes the input's first
/// byte decides; the second picks the exports. Everything the server side
/// does is checked against the protocol as it goes (`HandshakeOracle`,
/// `TransmissionOracle`); a broken rule stops the process, which is what the
/// fuzzer (`Fuzz/nbd-stream.swift`) looks for and what a unit test replays.
public enum StreamReplay {
    public enum Outcome: Equatable {
        /// The stream ended inside the handshake.
        case handshakeUnfinished
        /// The server closed during the handshake.
        case closedInHandshake(reason: String)
        /// Transmission started; `requests` headers were checked before the stream ended or the server closed.
        case transmission(requests: Int, closed: Bool)
    }

    /// The two bytes in front of the client's stream.
    public static let prefixLength = 2

    public static func run(_ input: UnsafeRawBufferPointer) -> Outcome {
        guard input.count >= prefixLength else { return .handshakeUnfinished }
        var chunks = Chunker(seed: input[0], stream: UnsafeRawBufferPointer(rebasing: input[prefixLength...]))
        let exports = Self.exports(variant: input[1])
        let tls = Self.tlsPolicy(variant: input[1])
        var handshake = Handshake(catalog: ReplayCatalog(listed: exports), tls: tls)
        var oracle = HandshakeOracle(exports: exports, tls: tls)
        var reply: [UInt8] = []

        var carried: UnsafeRawBufferPointer?
        while let chunk = carried ?? chunks.next() {
            carried = nil
            let step = handshake.receive(chunk, reply: &reply)
            switch step {
            case .needMore:
                oracle.clientSent(chunk)
                oracle.check(reply: reply, after: .needMore)
            case .close(let reason):
                oracle.clientSent(chunk)
                oracle.check(reply: reply, after: .closed)
                return .closedInHandshake(reason: reason)
            case .startTLS(let consumed):
                precondition(consumed >= 0 && consumed <= chunk.count, "STARTTLS consumed \(consumed) of \(chunk.count) bytes")
                oracle.clientSent(UnsafeRawBufferPointer(rebasing: chunk[..<consumed]))
                oracle.check(reply: reply, after: .startedTLS)
                // The replay has no TLS: what follows stands for the session's plaintext.
                if consumed < chunk.count { carried = UnsafeRawBufferPointer(rebasing: chunk[consumed...]) }
            case .finished(let negotiated, let consumed):
                precondition(consumed >= 0 && consumed <= chunk.count, "the handshake consumed \(consumed) of \(chunk.count) bytes")
                oracle.clientSent(UnsafeRawBufferPointer(rebasing: chunk[..<consumed]))
                oracle.check(reply: reply, after: .finished(negotiated))
                var transmission = TransmissionOracle(negotiated)
                var rest = UnsafeRawBufferPointer(rebasing: chunk[consumed...])
                var closed = !transmission.receive(&rest)
                while !closed, var next = chunks.next() {
                    closed = !transmission.receive(&next)
                }
                return .transmission(requests: transmission.requests, closed: closed)
            }
        }
        return .handshakeUnfinished
    }

    /// Bits 5-6: TLS off (0 and 1), on (2) or required (3).
    static func tlsPolicy(variant: UInt8) -> Handshake.TLSPolicy {
        [.off, .off, .on, .require][Int(variant >> 5) & 3]
    }

    /// Bit 0: the default export is read-only; bits 1-2: its block sizes;
    /// bits 3-4: its size (whole blocks or not). A second, read-only export
    /// with no contexts is always listed.
    static func exports(variant: UInt8) -> [ExportDescription] {
        let blockSizes = [
            BlockSizes(),
            BlockSizes(minimum: 512, preferred: 4096, maximum: 1 << 20),
            BlockSizes(minimum: 4096, preferred: 4096, maximum: 64 << 10),
            BlockSizes(minimum: 1, preferred: 512, maximum: 4096),
        ][Int(variant >> 1) & 3]
        let size: UInt64 = [64 << 10, (64 << 10) + 512, (64 << 10) + 1, 4095][Int(variant >> 3) & 3]
        let contexts = [MetaContextOffer(name: "keel:changed:s1", id: 2), MetaContextOffer(name: "keel:changed:s2", id: 3)]
        return [
            ExportDescription(name: "vol", description: "a volume", size: size, readOnly: variant & 1 == 1,
                              blockSizes: blockSizes, metaContexts: contexts),
            ExportDescription(name: "vol@snapshot:s1", size: 8192, readOnly: true),
        ]
    }
}

/// Cuts the stream into chunks of 1 to 64 bytes from a small seeded
/// generator; seed 0 gives the whole stream at once.
struct Chunker {
    private var state: UInt32
    private let whole: Bool
    private var rest: UnsafeRawBufferPointer

    init(seed: UInt8, stream: UnsafeRawBufferPointer) {
        state = UInt32(seed) &* 0x9E37_79B9 | 1
        whole = seed == 0
        rest = stream
    }

    mutating func next() -> UnsafeRawBufferPointer? {
        guard !rest.isEmpty else { return nil }
        var take = rest.count
        if !whole {
            state ^= state << 13
            state ^= state >> 17
            state ^= state << 5
            take = min(rest.count, Int(state % 64) + 1)
        }
        defer { rest = UnsafeRawBufferPointer(rebasing: rest[take...]) }
        return UnsafeRawBufferPointer(rebasing: rest[..<take])
    }
}

/// The exports, plus one that may be looked at but not opened (as a
/// replica claimed by a newer epoch answers): INFO and the meta context
/// options see it, GO and EXPORT_NAME are refused.
struct ReplayCatalog: ExportCatalog {
    static let busy = "vol@busy"
    let listed: [ExportDescription]

    func resolve(_ name: String, opening: Bool) -> ExportResolution {
        if name == Self.busy {
            return opening ? .refused(.errPolicy, "claimed by a newer epoch") : .found(listed[0])
        }
        return StaticExports(listed).resolve(name, opening: opening)
    }
}

