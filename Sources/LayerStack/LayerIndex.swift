/// What a layer records for a run of 4 KiB blocks. A block a layer does not
/// record is a hole there: its parent says what it holds.
public enum BlockContent: UInt8, Sendable {
    case data = 1
    /// Trimmed or zeroed: reads as zeroes, whatever older layers hold.
    case zero = 2
}

/// A layer's identity for its whole life (indexes shift when layers are removed).
public typealias LayerID = UInt32

/// Where a run of blocks is read from: the newest layer that records it.
public struct Placement: Equatable, Sendable {
    public var layer: LayerID
    public var content: BlockContent

    public init(layer: LayerID, content: BlockContent) {
        self.layer = layer
        self.content = content
    }
}

public struct Layer: Equatable, Sendable {
    public let id: LayerID
    /// What this layer records; everything else comes from its parent.
    public internal(set) var map: ExtentMap<BlockContent>

    public init(id: LayerID, map: ExtentMap<BlockContent> = ExtentMap()) {
        self.id = id
        self.map = map
    }
}

/// A replica's chain of layers in memory: the frozen snapshot layers, oldest
/// first, and the head on top, each with its own map, and one resolved map
/// saying which layer each block is read from, so that a read asks no layer
/// that does not hold its blocks, however long the chain.
public struct LayerIndex: Equatable {
    public private(set) var layers: [Layer]
    private var resolved = ExtentMap<Placement>()

    /// A chain of the given layers, oldest first; the last is the head.
    public init(layers: [Layer]) {
        precondition(!layers.isEmpty, "a chain has at least its head")
        precondition(Set(layers.map(\.id)).count == layers.count, "layer ids repeat")
        self.layers = layers
        resolved = Self.resolve(layers)
    }

    public var head: Layer { layers[layers.count - 1] }

    /// Bytes the resolved map and every layer's map take in memory.
    public var memoryBytes: Int { resolved.memoryBytes + layers.reduce(0) { $0 + $1.map.memoryBytes } }

    public var resolvedExtentCount: Int { resolved.count }

    /// A write (data) or a trim or zeroing (zero) reached the head; nil: the
    /// head no longer records the blocks (the bottom layer, whose file holds
    /// what no record says, after a write over zeroes it recorded).
    public mutating func record(_ content: BlockContent?, _ blocks: Range<UInt64>) {
        precondition(content != nil || layers.count == 1, "only the bottom layer forgets blocks")
        layers[layers.count - 1].map.set(blocks, to: content)
        resolved.set(blocks, to: content.map { Placement(layer: head.id, content: $0) })
    }

    /// Calls `body` for each run of `blocks` with the layer to read it from;
    /// nil where no layer records it (the bottom layer's file says).
    public func forEachPlacement(in blocks: Range<UInt64>, _ body: (Range<UInt64>, Placement?) -> Void) {
        resolved.forEach(in: blocks, body)
    }

    /// Like `forEachPlacement`, as of frozen layer `id`: what a snapshot's
    /// reader sees, whatever newer layers record. Runs come in block order.
    public func forEachPlacement(asOf id: LayerID, in blocks: Range<UInt64>, _ body: (Range<UInt64>, Placement?) -> Void) {
        guard let k = index(of: id) else { preconditionFailure("layer \(id) is not in the chain") }
        var found: [(Range<UInt64>, Placement?)] = []
        var pending = [blocks]
        for layer in layers[...k].reversed() where !pending.isEmpty {
            var holes: [Range<UInt64>] = []
            for run in pending {
                layer.map.forEach(in: run) { part, content in
                    if let content { found.append((part, Placement(layer: layer.id, content: content))) } else { holes.append(part) }
                }
            }
            pending = holes
        }
        found += pending.map { ($0, nil) }
        for (run, placement) in found.sorted(by: { $0.0.lowerBound < $1.0.lowerBound }) { body(run, placement) }
    }

    /// The head is frozen as it is (a snapshot); an empty head starts on top.
    public mutating func freezeHead(newHead id: LayerID) {
        precondition(!layers.contains { $0.id == id }, "layer \(id) already exists")
        layers.append(Layer(id: id))
    }

    public func index(of id: LayerID) -> Int? { layers.firstIndex { $0.id == id } }

    /// The runs of `blocks` that layers newer than `older`, up to and
    /// including `newer`, record (written, trimmed or zeroed: changed) and
    /// those they do not, in block order: the changed-blocks view between two
    /// snapshots, from the maps kept as writes came, without asking any file.
    public func forEachChange(after older: LayerID, through newer: LayerID, in blocks: Range<UInt64>,
                              _ body: (Range<UInt64>, _ changed: Bool) -> Void) {
        guard let from = index(of: older), let to = index(of: newer), from < to else {
            preconditionFailure("layer \(older) is not older than layer \(newer) in the chain")
        }
        var changed: [Range<UInt64>] = []
        for layer in layers[(from + 1)...to] {
            layer.map.forEach(in: blocks) { run, content in if content != nil { changed.append(run) } }
        }
        changed.sort { $0.lowerBound < $1.lowerBound }
        var position = blocks.lowerBound
        var current: Range<UInt64>?
        func emit(_ run: Range<UInt64>) {
            if position < run.lowerBound { body(position..<run.lowerBound, false) }
            body(run, true)
            position = run.upperBound
        }
        for run in changed {
            if let open = current, run.lowerBound <= open.upperBound {
                current = open.lowerBound..<max(open.upperBound, run.upperBound)
            } else {
                if let open = current { emit(open) }
                current = run
            }
        }
        if let open = current { emit(open) }
        if position < blocks.upperBound { body(position..<blocks.upperBound, false) }
    }

    // MARK: - Removing a snapshot

    /// What removing frozen layer `id` must give its child (the next newer
    /// layer): the runs it records that the child does not. Data runs are
    /// copied into the child's file before `remove` records them there.
    public func takeover(removing id: LayerID) -> [ExtentMap<BlockContent>.Extent] {
        guard let k = index(of: id), k < layers.count - 1 else { preconditionFailure("layer \(id) is not a frozen layer") }
        let child = layers[k + 1].map
        var runs: [ExtentMap<BlockContent>.Extent] = []
        for extent in layers[k].map.extents {
            child.forEach(in: extent.range) { run, value in
                if value == nil { runs.append(.init(start: run.lowerBound, end: run.upperBound, value: extent.value)) }
            }
        }
        return runs
    }

    /// What removing the bottom layer must give its child, which becomes the
    /// bottom: every block of `0..<blocks` the child does not record, with
    /// the bottom's record, or where it has none what its file holds
    /// (`fileContent`). The new bottom then records everything it is read
    /// for: where it records nothing, its own file answers, and that may hold
    /// a stray write whose record a crash cut.
    public func takeoverOfBottom(blocks: UInt64, fileContent: (Range<UInt64>) -> [(Range<UInt64>, BlockContent)])
        -> [ExtentMap<BlockContent>.Extent] {
        precondition(layers.count > 1, "the bottom layer is the head")
        var runs: [ExtentMap<BlockContent>.Extent] = []
        func add(_ run: Range<UInt64>, _ content: BlockContent) {
            if let last = runs.last, last.end == run.lowerBound, last.value == content {
                runs[runs.count - 1].end = run.upperBound
            } else {
                runs.append(.init(start: run.lowerBound, end: run.upperBound, value: content))
            }
        }
        layers[1].map.forEach(in: 0..<blocks) { run, childContent in
            guard childContent == nil else { return }
            layers[0].map.forEach(in: run) { part, content in
                if let content { return add(part, content) }
                for (piece, fileContent) in fileContent(part) { add(piece, fileContent) }
            }
        }
        return runs
    }

    /// Layer `id` goes; its child records `takeover` (whose data is in the
    /// child's file by now), and blocks read from `id` are read from the
    /// child (the bottom's unrecorded blocks too, when `id` is the bottom).
    public mutating func remove(_ id: LayerID, takeover runs: [ExtentMap<BlockContent>.Extent]) {
        guard let k = index(of: id), k < layers.count - 1 else { preconditionFailure("layer \(id) is not a frozen layer") }
        let childID = layers[k + 1].id
        for run in runs {
            layers[k + 1].map.set(run.range, to: run.value)
            // Where a layer newer than the child records the block, reads stay there.
            var readFromRemoved: [Range<UInt64>] = []
            resolved.forEach(in: run.range) { part, placement in
                if placement?.layer == id || (k == 0 && placement == nil) { readFromRemoved.append(part) }
            }
            for part in readFromRemoved { resolved.set(part, to: Placement(layer: childID, content: run.value)) }
        }
        layers.remove(at: k)
    }

    // MARK: - Reverting

    /// The head and every layer newer than `id` go; a new empty head starts on `id`.
    public mutating func revert(to id: LayerID, newHead: LayerID) {
        guard let k = index(of: id), k < layers.count - 1 else { preconditionFailure("layer \(id) is not a frozen layer") }
        layers.removeSubrange((k + 1)...)
        resolved = Self.resolve(layers)
        freezeHead(newHead: newHead)
    }

    /// The resolved map of a chain: each layer, oldest first, over the ones below.
    private static func resolve(_ layers: [Layer]) -> ExtentMap<Placement> {
        var resolved = ExtentMap<Placement>()
        for layer in layers {
            for extent in layer.map.extents {
                resolved.set(extent.range, to: Placement(layer: layer.id, content: extent.value))
            }
        }
        return resolved
    }
}
