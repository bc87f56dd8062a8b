import LayerStack
import SeededRandom
import Testing

@Suite struct ExtentMapTests {
    private func runs(_ map: ExtentMap<Int>) -> [String] { map.extents.map { "\($0.start)-\($0.end):\($0.value)" } }

    @Test func adjacentEqualValuesMergeAndOthersSplit() {
        var map = ExtentMap<Int>()
        map.set(0..<4, to: 1)
        map.set(4..<8, to: 1)
        #expect(runs(map) == ["0-8:1"])
        map.set(2..<3, to: 2)
        #expect(runs(map) == ["0-2:1", "2-3:2", "3-8:1"])
        map.set(2..<3, to: 1)
        #expect(runs(map) == ["0-8:1"])
        map.set(3..<5, to: nil)
        #expect(runs(map) == ["0-3:1", "5-8:1"])
        map.set(10..<12, to: 2)
        map.set(0..<11, to: 3)
        #expect(runs(map) == ["0-11:3", "11-12:2"])
        #expect(map.count == 2)
    }

    @Test func runsCoverTheRangeAskedWithHolesAsNil() {
        var map = ExtentMap<Int>()
        map.set(2..<4, to: 7)
        map.set(6..<9, to: 8)
        var seen: [String] = []
        map.forEach(in: 0..<8) { run, value in seen.append("\(run.lowerBound)-\(run.upperBound):\(value.map { "\($0)" } ?? "-")") }
        #expect(seen == ["0-2:-", "2-4:7", "4-6:-", "6-8:8"])
        #expect(map.value(at: 3) == 7 && map.value(at: 4) == nil)
    }

    /// Random sets and holes over many chunks against one value per block.
    @Test(arguments: [1, 2, 3, 4] as [UInt64])
    func randomChangesMatchABlockModel(seed: UInt64) {
        var random = SplitMix64(seed: seed)
        let blocks: UInt64 = 20_000
        var model = [Int?](repeating: nil, count: Int(blocks))
        var map = ExtentMap<Int>()
        for step in 0..<6_000 {
            let start = random.below(blocks)
            let length: UInt64 = random.below(4) == 0 ? 1 + random.below(2_000) : 1 + random.below(8)
            let end = min(blocks, start + length)
            let value: Int? = random.below(5) == 0 ? nil : Int(random.below(3))
            map.set(start..<end, to: value)
            for b in start..<end { model[Int(b)] = value }
            if step % 500 == 0 || step == 5_999 {
                var rebuilt = [Int?](repeating: nil, count: Int(blocks))
                var previous: ExtentMap<Int>.Extent?
                for extent in map.extents {
                    #expect(extent.start < extent.end)
                    if let previous {
                        #expect(previous.end <= extent.start, "extents overlap (seed \(seed))")
                        #expect(previous.end < extent.start || previous.value != extent.value, "unmerged neighbours (seed \(seed))")
                    }
                    for b in extent.range { rebuilt[Int(b)] = extent.value }
                    previous = extent
                }
                #expect(rebuilt == model, "seed \(seed), step \(step)")
                let lo = random.below(blocks), hi = min(blocks, lo + 1 + random.below(3_000))
                var covered = lo
                map.forEach(in: lo..<hi) { run, value in
                    #expect(run.lowerBound == covered)
                    for b in run { #expect(model[Int(b)] == value) }
                    covered = run.upperBound
                }
                #expect(covered == hi)
            }
        }
    }

    /// Thousands of one-block extents (dozens of chunks): every block, and
    /// every run that starts at a chunk's edge, reads back its value. A lookup
    /// of the block just before a chunk's first extent once found a hole.
    @Test func lookupsAtChunkEdgesFindTheirExtent() {
        var map = ExtentMap<Int>()
        let blocks = 20_000
        for b in stride(from: 0, to: blocks, by: 2) { map.set(UInt64(b)..<UInt64(b + 1), to: b % 3) }
        for b in stride(from: 1, to: blocks, by: 2) { map.set(UInt64(b)..<UInt64(b + 1), to: 7) }
        #expect(map.count == blocks)
        for b in 0..<blocks {
            #expect(map.value(at: UInt64(b)) == (b % 2 == 1 ? 7 : b % 3), "block \(b)")
        }
        // Setting a block to its left neighbour's value merges across a chunk edge.
        for b in stride(from: 1, to: blocks, by: 2) { map.set(UInt64(b)..<UInt64(b + 1), to: (b - 1) % 3) }
        let extents = map.extents
        for (previous, extent) in zip(extents, extents.dropFirst()) {
            #expect(previous.end < extent.start || previous.value != extent.value, "unmerged neighbours at \(extent.start)")
        }
    }
}
