/// SplitMix64: a small seeded generator for simulators, fuzzers and model
/// tests. Every choice of a run comes from its seed, so a seed replays; the
/// helpers below take no detour through the standard library's sampling, so
/// a seed gives the same run on every platform and toolchain.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    public var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// 0 ..< n.
    public mutating func below(_ n: Int) -> Int {
        precondition(n > 0)
        return Int(next() % UInt64(n))
    }

    /// 0 ..< n.
    public mutating func below(_ n: UInt64) -> UInt64 {
        precondition(n > 0)
        return next() % n
    }

    /// True with probability `perMille` / 1000.
    public mutating func chance(perMille: Int) -> Bool { below(1000) < perMille }
}
