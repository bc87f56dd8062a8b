import Foundation
import NBDProtocol
import NBDStreamReplay
import Testing

/// The libFuzzer harness's driver (`StreamReplay`, run by `Bench/fuzz`):
/// the seed streams it starts from, built here with the protocol tests'
/// client helpers, reach the phase they are meant to; every input kept in
/// `Fuzz/corpus/nbd-stream` replays without breaking a rule. A crash the
/// fuzzer finds is added to that directory (and so replayed here).
@Suite struct StreamReplayTests {
    static let corpus = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz/corpus/nbd-stream")

    /// Chunking seed 7 and exports variant 0 (a writable default export), then the stream.
    static func input(_ stream: [UInt8], chunking: UInt8 = 7, variant: UInt8 = 0) -> [UInt8] {
        [chunking, variant] + stream
    }

    static func request(_ type: CommandType, flags: CommandFlags = [], offset: UInt64, length: UInt32) -> [UInt8] {
        RequestHeader(type: type, flags: flags, handle: offset &+ 1, offset: offset, length: length).encoded
    }

    static let structuredGo = Client.flags() + Client.option(.structuredReply)
        + Client.option(.setMetaContext, Client.meta("vol", ["base:allocation", "keel:changed:s1"]))
        + Client.option(.go, Client.info("vol", [.blockSize, .name]))

    static let requests = request(.write, flags: .fua, offset: 4096, length: 8) + Array(repeating: 0xA5, count: 8)
        + request(.read, flags: .dontFragment, offset: 4090, length: 16)
        + request(.writeZeroes, flags: [.noHole, .fastZero], offset: 0, length: 4096)
        + request(.trim, offset: 8192, length: 4096)
        + request(.blockStatus, flags: .requestOne, offset: 0, length: 65536)
        + request(.flush, offset: 0, length: 0)
        + request(.cache, offset: 0, length: 512)
        + request(.read, offset: 65536, length: 1)

    /// The seed corpus: named streams, and the outcome each must have.
    static let seeds: [(name: String, input: [UInt8], outcome: StreamReplay.Outcome)] = [
        ("go-structured-requests", input(structuredGo + requests), .transmission(requests: 8, closed: false)),
        ("go-structured-disc", input(structuredGo + requests + request(.disconnect, offset: 0, length: 0), chunking: 0),
         .transmission(requests: 9, closed: true)),
        ("go-simple-read-only", input(Client.flags() + Client.option(.go, Client.info("", [])) + requests, variant: 1),
         .transmission(requests: 8, closed: false)),
        ("export-name-zeroes", input(Client.flags([.fixedNewstyle]) + Client.option(.exportName, Array("vol".utf8))
                                     + request(.read, offset: 0, length: 4096), variant: 0x1A),
         .transmission(requests: 1, closed: false)),
        ("list-info-meta-abort", input(Client.flags() + Client.option(.list)
                                       + Client.option(.info, Client.info("vol@snapshot:s1", [.description]))
                                       + Client.option(.listMetaContext, Client.meta("vol", ["keel:"]))
                                       + Client.option(.startTLS) + Client.option(.abort)),
         .closedInHandshake(reason: "client aborted the handshake")),
        ("unknown-option-too-big", input(Client.flags() + Client.option(99, [1, 2, 3])
                                         + u64(NBDMagic.option) + u32(OptionType.list.rawValue) + u32(70_000)
                                         + Array(repeating: 0, count: 70_000) + Client.option(.go, Client.info("vol"))),
         .transmission(requests: 0, closed: false)),
        ("bad-request-magic", input(structuredGo + u32(0xDEAD_BEEF) + Array(repeating: 0, count: 24)),
         .transmission(requests: 0, closed: true)),
        ("busy-export-refused", input(Client.flags() + Client.option(.info, Client.info("vol@busy"))
                                      + Client.option(.go, Client.info("vol@busy")) + Client.option(.go, Client.info("vol"))),
         .transmission(requests: 0, closed: false)),
        ("write-too-long", input(Client.flags() + Client.option(.go, Client.info("vol"))
                                 + request(.write, offset: 0, length: 1 << 30)),
         .transmission(requests: 1, closed: true)),
        // Variant 0x60: TLS required. Refused options, then STARTTLS; the rest stands for the session's plaintext.
        ("tls-required-then-started", input(Client.flags() + Client.option(.list) + Client.option(.structuredReply)
                                            + Client.option(.startTLS) + structuredGo.dropFirst(4) + requests, variant: 0x60),
         .transmission(requests: 8, closed: false)),
        ("tls-required-export-name-closes", input(Client.flags() + Client.option(.exportName, Array("vol".utf8)), variant: 0x60),
         .closedInHandshake(reason: "EXPORT_NAME without TLS, which this server requires")),
        // Variant 0x40: TLS offered. STARTTLS with data, then twice.
        ("tls-on-starttls-twice", input(Client.flags() + Client.option(.startTLS, [1]) + Client.option(.startTLS)
                                        + Client.option(.startTLS) + Client.option(.exportName, Array("vol".utf8))
                                        + request(.read, offset: 0, length: 512), variant: 0x40),
         .transmission(requests: 1, closed: false)),
    ]

    @Test(arguments: seeds.map(\.name))
    func seedStreamReachesItsPhase(_ name: String) {
        let seed = Self.seeds.first { $0.name == name }!
        let outcome = seed.input.withUnsafeBytes { StreamReplay.run($0) }
        #expect(outcome == seed.outcome)
    }

    @Test(arguments: 0 ..< 8)
    func everyChunkingGivesTheSameOutcome(_ chunking: UInt8) {
        for seed in Self.seeds {
            var input = seed.input
            input[0] = chunking
            #expect(input.withUnsafeBytes { StreamReplay.run($0) } == seed.outcome, "\(seed.name)")
        }
    }

    @Test func theKeptCorpusReplays() throws {
        let files = try FileManager.default.contentsOfDirectory(atPath: Self.corpus.path).sorted()
        #expect(files.count >= Self.seeds.count)
        for file in files {
            let bytes = try [UInt8](Data(contentsOf: Self.corpus.appendingPathComponent(file)))
            _ = bytes.withUnsafeBytes { StreamReplay.run($0) }
        }
    }

    /// `KEEL_WRITE_FUZZ_SEEDS=1 swift test --filter StreamReplayTests` writes the seeds into the corpus.
    @Test func seedsAreInTheCorpus() throws {
        for seed in Self.seeds {
            let path = Self.corpus.appendingPathComponent("seed-" + seed.name)
            if ProcessInfo.processInfo.environment["KEEL_WRITE_FUZZ_SEEDS"] != nil {
                try FileManager.default.createDirectory(at: Self.corpus, withIntermediateDirectories: true)
                try Data(seed.input).write(to: path)
            }
            #expect(try Data(contentsOf: path) == Data(seed.input), "\(seed.name)")
        }
    }
}
