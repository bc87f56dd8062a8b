import LayerStack
import SeededRandom
import Testing

/// The chain against a model that keeps, per layer, what each block holds,
/// and finds a block's layer by walking down from the head.
@Suite struct LayerIndexTests {
    private struct Model {
        var layers: [(id: LayerID, blocks: [BlockContent?])]

        func placement(_ b: Int) -> Placement? {
            for layer in layers.reversed() {
                if let content = layer.blocks[b] { return Placement(layer: layer.id, content: content) }
            }
            return nil
        }
    }

    private func check(_ index: LayerIndex, _ model: Model, _ blocks: Int, _ what: String) {
        #expect(index.layers.map(\.id) == model.layers.map(\.id), "\(what): layer ids")
        var at: UInt64 = 0
        index.forEachPlacement(in: 0..<UInt64(blocks)) { run, placement in
            #expect(run.lowerBound == at)
            for b in run where model.placement(Int(b)) != placement {
                Issue.record("\(what): block \(b) read from \(String(describing: placement)), model \(String(describing: model.placement(Int(b))))")
                return
            }
            at = run.upperBound
        }
        for (layer, modelled) in zip(index.layers, model.layers) {
            var blocksOfLayer = [BlockContent?](repeating: nil, count: blocks)
            for extent in layer.map.extents { for b in extent.range { blocksOfLayer[Int(b)] = extent.value } }
            #expect(blocksOfLayer == modelled.blocks, "\(what): layer \(layer.id)'s map")
        }
    }

    @Test func aSnapshotKeepsItsBlocksThroughWritesAndTrimsInTheHead() {
        var index = LayerIndex(layers: [Layer(id: 1)])
        index.record(.data, 0..<8)
        index.freezeHead(newHead: 2)
        index.record(.data, 2..<4)
        index.record(.zero, 6..<10)
        var runs: [String] = []
        index.forEachPlacement(in: 0..<12) { run, placement in
            runs.append("\(run.lowerBound)-\(run.upperBound):" + (placement.map { "\($0.layer)\($0.content == .zero ? "z" : "")" } ?? "-"))
        }
        #expect(runs == ["0-2:1", "2-4:2", "4-6:1", "6-10:2z", "10-12:-"])
        #expect(index.layers[0].map.extents.map(\.range) == [0..<8], "the trim did not reach the snapshot")
        var changed: [Range<UInt64>] = []
        index.forEachChange(after: 1, through: 2, in: 0..<12) { run, isChanged in if isChanged { changed.append(run) } }
        #expect(changed == [2..<4, 6..<10])
    }

    /// The bottom's file answers for what it does not record: its child,
    /// becoming the bottom, records all it does not hold (data from the file,
    /// zeroes where the file has holes), so that its own file never answers.
    @Test func removingTheBottomHandsItsChildEverythingTheChildDoesNotRecord() {
        var index = LayerIndex(layers: [Layer(id: 1)])
        index.record(.zero, 8..<10)
        index.freezeHead(newHead: 2)
        index.record(.data, 2..<4)
        let fileData: Range<UInt64> = 0..<6
        let takeover = index.takeoverOfBottom(blocks: 12) { run in
            let data = max(run.lowerBound, fileData.lowerBound)..<max(min(run.upperBound, fileData.upperBound), max(run.lowerBound, fileData.lowerBound))
            var pieces: [(Range<UInt64>, BlockContent)] = []
            if !data.isEmpty { pieces.append((data, .data)) }
            if data.upperBound < run.upperBound { pieces.append((max(data.upperBound, run.lowerBound)..<run.upperBound, .zero)) }
            return pieces
        }
        #expect(takeover.map { "\($0.start)-\($0.end):\($0.value)" } == ["0-2:data", "4-6:data", "6-12:zero"])
        index.remove(1, takeover: takeover)
        var placements: [String] = []
        index.forEachPlacement(in: 0..<12) { run, placement in placements.append("\(run.lowerBound)-\(run.upperBound):\(placement.map { "\($0.layer)" } ?? "-")") }
        #expect(placements == ["0-6:2", "6-12:2"], "data, then zeroes, all from the child")
    }

    @Test func removingASnapshotHandsItsChildOnlyWhatTheChildDoesNotRecord() {
        var index = LayerIndex(layers: [Layer(id: 1)])
        index.record(.data, 0..<10)
        index.freezeHead(newHead: 2)
        index.record(.data, 4..<6)
        index.freezeHead(newHead: 3)
        index.record(.zero, 0..<2)
        let takeover = index.takeover(removing: 1)
        #expect(takeover.map(\.range) == [0..<4, 6..<10])
        index.remove(1, takeover: takeover)
        var placements: [String] = []
        index.forEachPlacement(in: 0..<10) { run, placement in placements.append("\(run.lowerBound)-\(run.upperBound):\(placement!.layer)") }
        #expect(placements == ["0-2:3", "2-10:2"])
    }

    @Test(arguments: [11, 12, 13] as [UInt64])
    func randomChainsMatchTheModel(seed: UInt64) {
        var random = SplitMix64(seed: seed)
        let blocks = 512
        var nextID: LayerID = 2
        var index = LayerIndex(layers: [Layer(id: 1)])
        var model = Model(layers: [(1, [BlockContent?](repeating: nil, count: blocks))])
        for step in 0..<3_000 {
            let roll = random.below(100)
            if roll < 80 {
                let start = Int(random.below(UInt64(blocks)))
                let end = min(blocks, start + 1 + Int(random.below(random.below(4) == 0 ? 64 : 4)))
                let content: BlockContent = random.below(5) == 0 ? .zero : .data
                index.record(content, UInt64(start)..<UInt64(end))
                for b in start..<end { model.layers[model.layers.count - 1].blocks[b] = content }
            } else if roll < 90 || index.layers.count < 2 {
                index.freezeHead(newHead: nextID)
                model.layers.append((nextID, [BlockContent?](repeating: nil, count: blocks)))
                nextID += 1
            } else if roll < 98 {
                let k = Int(random.below(UInt64(index.layers.count - 1)))
                let id = index.layers[k].id
                let takeover = index.takeover(removing: id)
                index.remove(id, takeover: takeover)
                for b in 0..<blocks where model.layers[k + 1].blocks[b] == nil {
                    model.layers[k + 1].blocks[b] = model.layers[k].blocks[b]
                }
                model.layers.remove(at: k)
            } else {
                let k = Int(random.below(UInt64(index.layers.count - 1)))
                index.revert(to: index.layers[k].id, newHead: nextID)
                model.layers.removeSubrange((k + 1)...)
                model.layers.append((nextID, [BlockContent?](repeating: nil, count: blocks)))
                nextID += 1
            }
            if step % 100 == 0 || step == 2_999 { check(index, model, blocks, "seed \(seed), step \(step)") }
            if index.layers.count >= 3 && step % 20 == 0 {
                let older = index.layers[0].id, newer = index.layers[index.layers.count - 1].id
                var changed = [Bool](repeating: false, count: blocks)
                let from = UInt64(random.below(blocks)), to = from + 1 + UInt64(random.below(blocks - Int(from)))
                var covered = from
                index.forEachChange(after: older, through: newer, in: from..<to) { run, isChanged in
                    #expect(run.lowerBound == covered, "runs cover the range in order")
                    covered = run.upperBound
                    for b in run { changed[Int(b)] = isChanged }
                }
                #expect(covered == to)
                for b in Int(from)..<Int(to) {
                    let expected = model.layers[1...].contains { $0.blocks[b] != nil }
                    if changed[b] != expected {
                        Issue.record("seed \(seed), step \(step): changed view at block \(b)")
                        break
                    }
                }
            }
        }
    }

    /// A chain of 1000 snapshots, each with writes of its own: reads find every
    /// block's layer through the resolved map alone. Prints the index's memory per extent.
    @Test func aThousandSnapshots() {
        var random = SplitMix64(seed: 1000)
        let blocks: UInt64 = 1 << 18   // 1 GiB of 4 KiB blocks
        var index = LayerIndex(layers: [Layer(id: 1)])
        var expected = [LayerID](repeating: 0, count: Int(blocks))
        for layer in 1...1000 {
            for _ in 0..<64 {
                let start = random.below(blocks - 16)
                let run = start..<start + 1 + random.below(16)
                index.record(.data, run)
                for b in run { expected[Int(b)] = LayerID(layer) }
            }
            index.freezeHead(newHead: LayerID(layer + 1))
        }
        #expect(index.layers.count == 1001)
        var mismatches = 0
        index.forEachPlacement(in: 0..<blocks) { run, placement in
            for b in run where (placement?.layer ?? 0) != expected[Int(b)] { mismatches += 1 }
        }
        #expect(mismatches == 0)
        let layerExtents = index.layers.reduce(0) { $0 + $1.map.count }
        let extents = index.resolvedExtentCount + layerExtents
        print("layer index: 1000 snapshots, \(index.resolvedExtentCount) resolved extents + \(layerExtents) layer extents, "
              + "\(index.memoryBytes) bytes, \(index.memoryBytes / extents) bytes per extent")
    }
}
