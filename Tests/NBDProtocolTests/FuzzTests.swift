import NBDProtocol
import SeededRandom
import Testing

/// The fuzzer's choices, all from one seeded generator so every run sees the same inputs.
extension SplitMix64 {
    mutating func bytes(_ count: Int) -> [UInt8] { (0 ..< count).map { _ in UInt8.random(in: .min ... .max, using: &self) } }

    mutating func pick<T>(_ choices: [T]) -> T { choices.randomElement(using: &self)! }

    mutating func chance(_ percent: Int) -> Bool { Int.random(in: 0 ..< 100, using: &self) < percent }

    /// Chunk sizes: mostly tiny, sometimes large, so every boundary gets hit.
    mutating func chunkSize(_ remaining: Int) -> Int {
        chance(70) ? Int.random(in: 1 ... 8, using: &self) : Int.random(in: 1 ... Swift.max(1, remaining), using: &self)
    }

    /// Flips bits, overwrites, inserts, deletes or truncates a few times.
    mutating func mutate(_ input: [UInt8]) -> [UInt8] {
        var bytes = input
        for _ in 0 ..< Int.random(in: 1 ... 3, using: &self) where !bytes.isEmpty {
            let at = Int.random(in: 0 ..< bytes.count, using: &self)
            switch Int.random(in: 0 ..< 5, using: &self) {
            case 0: bytes[at] ^= 1 << UInt8.random(in: 0 ..< 8, using: &self)
            case 1: bytes[at] = pick([0, 0xFF, 0x80, 0x7F, UInt8.random(in: .min ... .max, using: &self)])
            case 2: bytes.insert(UInt8.random(in: .min ... .max, using: &self), at: at)
            case 3: bytes.remove(at: at)
            default: bytes.removeLast(bytes.count - at)
            }
        }
        return bytes
    }
}

extension ParsedEvent {
    var isBadMagic: Bool {
        if case .badMagic = self { return true }
        return false
    }
}

/// Bounded, deterministic fuzzing of the handshake and of the request path.
@Suite struct FuzzTests {
    // MARK: - Handshake

    static func randomOption(_ rng: inout SplitMix64) -> [UInt8] {
        let name = rng.pick(["", "disk", "iso", "nope"])
        let queries = (0 ..< Int.random(in: 0 ... 2, using: &rng)).map { _ in
            rng.pick(["base:", "base:allocation", "base:x", "qemu:dirty-bitmap:a", "nocolon"])
        }
        let infos = (0 ..< Int.random(in: 0 ... 3, using: &rng)).map { _ in
            rng.pick([InfoType.export, .name, .description, .blockSize])
        }
        // Weighted so that sessions often get as far as GO with contexts selected.
        switch Int.random(in: 0 ..< 20, using: &rng) {
        case 0 ... 1: return Client.option(UInt32.random(in: 11 ... 20, using: &rng), rng.bytes(Int.random(in: 0 ... 8, using: &rng)))
        case 2 ... 3: return Client.option(.list)
        case 4: return Client.option(.startTLS)
        case 5 ... 7: return Client.option(.structuredReply)
        case 8 ... 9: return Client.option(.listMetaContext, Client.meta(name, queries))
        case 10 ... 12: return Client.option(.setMetaContext, Client.meta(name, queries))
        case 13 ... 14: return Client.option(.info, Client.info(name, infos))
        case 15 ... 17: return Client.option(.go, Client.info(name, infos))
        case 18: return Client.option(.exportName, Array(name.utf8))
        default: return Client.option(.abort)
        }
    }

    static func handshakeInput(_ rng: inout SplitMix64) -> [UInt8] {
        switch Int.random(in: 0 ..< 10, using: &rng) {
        case 0: return rng.bytes(Int.random(in: 0 ... 64, using: &rng))
        case 1: return Client.flags() + rng.bytes(Int.random(in: 0 ... 64, using: &rng))
        default:
            var session = Client.flags(rng.pick([.fixedNewstyle, [.fixedNewstyle, .noZeroes]]))
            if rng.chance(40) {
                session += Client.option(.structuredReply)
                    + Client.option(.setMetaContext, Client.meta(rng.pick(["", "disk"]), ["base:allocation"]))
            }
            for _ in 0 ..< Int.random(in: 1 ... 6, using: &rng) { session += randomOption(&rng) }
            if rng.chance(50) { session += rng.bytes(Int.random(in: 1 ... 40, using: &rng)) }
            return rng.chance(60) ? rng.mutate(session) : session
        }
    }

    /// The reply is a clean run of option replies, optionally ended by an EXPORT_NAME answer.
    static func wellFormed(_ reply: [UInt8], finished: Bool) -> Bool {
        if OptionReply.decode(reply) != nil { return true }
        return finished && [10, 134].contains { reply.count >= $0 && OptionReply.decode(Array(reply.dropLast($0))) != nil }
    }

    @Test func handshake() {
        var rng = SplitMix64(seed: 0x4B45_454C_0001)
        var emittedAfterClose = 0
        for iteration in 0 ..< 6000 {
            let input = Self.handshakeInput(&rng)
            let whole = runHandshake(input)
            let split = runHandshake(input, chunkSize: { rng.chunkSize($0) })
            #expect(split.outcome == whole.outcome, "iteration \(iteration)")
            #expect(split.reply == whole.reply, "iteration \(iteration)")
            #expect(Self.wellFormed(whole.reply, finished: whole.negotiated != nil), "iteration \(iteration)")
            if case .finished(_, let consumed) = whole.outcome {
                #expect(consumed <= input.count)
            }

            // Whatever follows a final step must not produce more output.
            var machine = whole.handshake
            var after: [UInt8] = []
            _ = machine.feed(Array(input[whole.fed...]) + Client.option(.list), reply: &after)
            switch whole.outcome {
            case .finished: #expect(after.isEmpty, "iteration \(iteration): reply after .finished")
            case .close: if !after.isEmpty { emittedAfterClose += 1 }
            case .needMore, .startTLS: break
            }
        }
        #expect(emittedAfterClose == 0)
    }

    // MARK: - Requests

    static let policies: [RequestPolicy] = [
        RequestPolicy(Negotiated(export: Fixtures.disk, structuredReplies: true, baseAllocation: true)),
        RequestPolicy(Negotiated(export: Fixtures.iso, structuredReplies: false, baseAllocation: false)),
        RequestPolicy(Negotiated(export: ExportDescription(name: "max", size: .max, readOnly: false),
                                 structuredReplies: true, baseAllocation: true)),
    ]

    static func randomRequest(_ rng: inout SplitMix64, exportSize: UInt64) -> [UInt8] {
        let max = UInt64(BlockSizes.maximumPayload)
        let type = rng.chance(90) ? UInt16.random(in: 0 ... 7, using: &rng) : UInt16.random(in: .min ... .max, using: &rng)
        let flags = rng.pick([0, 0, 0, CommandFlags.fua.rawValue, UInt16.random(in: 0 ..< 32, using: &rng),
                              UInt16.random(in: .min ... .max, using: &rng)])
        let offset = rng.pick([0, 4096, exportSize &- 1, exportSize, exportSize &+ 1, .max, .max - 511,
                               UInt64.random(in: 0 ... exportSize, using: &rng), rng.next()])
        var length = UInt32(rng.pick([0, 1, 512, 4096, max - 1, max, max + 1, UInt64(UInt32.max)]))
        // Large WRITE payloads only cost time to generate; the header alone tests the policy.
        if type == CommandType.write.rawValue, length > 4096 { length = UInt32.random(in: 0 ... 4096, using: &rng) }
        let header = RequestHeader(flags: flags, type: type, handle: rng.next(), offset: offset, length: length)
        return header.encoded + rng.bytes(Int(header.payloadLength))
    }

    /// Properties any verdict must have, without restating the policy.
    static func verdictIsConsistent(_ verdict: RequestPolicy.Verdict, _ header: RequestHeader,
                                    _ negotiated: Negotiated) -> Bool {
        let export = negotiated.export
        let (end, overflow) = header.offset.addingReportingOverflow(UInt64(header.length))
        let inRange = !overflow && end <= export.size
        let allowed: CommandFlags = [.fua, .noHole, .dontFragment, .requestOne, .fastZero]
        switch verdict {
        case .accept(let command):
            guard command == header.command, header.commandFlags.isSubset(of: allowed) else { return false }
            switch command {
            case .read, .cache: return inRange && header.length <= export.blockSizes.maximum
            case .write: return inRange && header.length <= export.blockSizes.maximum && !export.readOnly
            case .trim, .writeZeroes: return inRange && !export.readOnly
            case .blockStatus: return inRange && negotiated.baseAllocation && header.length > 0
            case .flush: return true
            case .disconnect: return false
            }
        case .reject(let error):
            switch error {
            case .permission: return export.readOnly
            case .noSpace: return (header.command == .write || header.command == .writeZeroes) && !inRange
            case .invalid: return true
            default: return false
            }
        case .disconnect:
            return header.command == .disconnect
                || (header.command == .write && header.length > export.blockSizes.maximum)
        }
    }

    @Test func requests() {
        var rng = SplitMix64(seed: 0x4B45_454C_0002)
        for iteration in 0 ..< 5000 {
            let policy = rng.pick(Self.policies)
            var input: [UInt8] = []
            for _ in 0 ..< Int.random(in: 1 ... 5, using: &rng) {
                input += Self.randomRequest(&rng, exportSize: policy.negotiated.export.size)
            }
            if rng.chance(30) { input = rng.mutate(input) }

            var parser = RequestParser()
            var events: [ParsedEvent] = []
            var offset = 0
            while offset < input.count, !(events.last?.isBadMagic ?? false) {
                let size = Swift.min(rng.chunkSize(input.count - offset), input.count - offset)
                events += parse(Array(input[offset ..< offset + size]), with: &parser)
                offset += size
            }
            var whole = RequestParser()
            #expect(coalesced(events) == coalesced(parse(input, with: &whole)), "iteration \(iteration)")

            // Framing: payload only after a WRITE header, exactly as long as it says.
            var used = 0
            var owed = 0
            for event in events {
                switch event {
                case .header(let header):
                    #expect(owed == 0, "iteration \(iteration): header inside a payload")
                    #expect(Self.verdictIsConsistent(policy.check(header), header, policy.negotiated),
                            "iteration \(iteration): \(policy.check(header)) for \(header)")
                    used += RequestHeader.size
                    owed = Int(header.payloadLength)
                case .payload(let bytes, let isLast):
                    #expect(!bytes.isEmpty && bytes.count <= owed, "iteration \(iteration)")
                    owed -= bytes.count
                    #expect(isLast == (owed == 0), "iteration \(iteration)")
                    used += bytes.count
                case .badMagic:
                    used += RequestHeader.size
                }
            }
            #expect(used <= input.count, "iteration \(iteration): used \(used) of \(input.count)")
        }
    }
}
