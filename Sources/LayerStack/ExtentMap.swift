/// Ranges of blocks mapped to values, in order, adjacent equal values merged:
/// what a layer holds (data or zeroes) and, for a whole chain, which layer
/// holds each block. Unmapped blocks are holes.
///
/// The extents live in chunks of a few hundred, each a sorted array, with
/// the chunks' first starts kept apart for a binary search (the shape of
/// Python's sortedcontainers): a change moves at most a chunk's worth of
/// entries, a lookup is two binary searches, and memory is one `Extent` per
/// extent plus a little per chunk, however large the volume.
public struct ExtentMap<Value: Equatable>: Equatable {
    public struct Extent: Equatable {
        public var start: UInt64
        public var end: UInt64
        public var value: Value

        public init(start: UInt64, end: UInt64, value: Value) {
            self.start = start
            self.end = end
            self.value = value
        }

        public var range: Range<UInt64> { start..<end }
    }

    private var chunks: [[Extent]] = []
    /// `chunks[i][0].start` for every chunk, none of which is empty.
    private var firstStarts: [UInt64] = []
    /// A chunk splits in two above this many extents.
    static var chunkLimit: Int { 512 }

    public init() {}

    /// The same extents, however they are chunked.
    public static func == (lhs: ExtentMap, rhs: ExtentMap) -> Bool { lhs.extents == rhs.extents }

    public var isEmpty: Bool { chunks.isEmpty }

    /// How many extents: runs of blocks with one value.
    public private(set) var count = 0

    /// Bytes the extents take in memory, chunk arrays and their index included.
    public var memoryBytes: Int {
        count * MemoryLayout<Extent>.stride + chunks.count * (MemoryLayout<[Extent]>.stride + MemoryLayout<UInt64>.stride + 32)
    }

    /// Every extent, in order.
    public var extents: [Extent] { chunks.flatMap { $0 } }

    /// Maps `range` to `value`, or (nil) makes it a hole.
    public mutating func set(_ range: Range<UInt64>, to value: Value?) {
        guard !range.isEmpty else { return }
        // Every extent that overlaps the range or touches it (to merge with) goes; what is left of
        // the outer two, the new extent, and neighbours of another value come back.
        let (startChunk, startIndex) = position(firstEndingAtOrAfter: range.lowerBound)
        var first: Extent?
        var last: Extent?
        var c = startChunk, i = startIndex
        while c < chunks.count {
            var j = i
            while j < chunks[c].count && chunks[c][j].start <= range.upperBound {
                if first == nil { first = chunks[c][j] }
                last = chunks[c][j]
                j += 1
            }
            let reachedEnd = j == chunks[c].count
            chunks[c].removeSubrange(i..<j)
            count -= j - i
            guard reachedEnd else { break }
            c += 1
            i = 0
        }
        var pieces: [Extent] = []
        var newStart = range.lowerBound, newEnd = range.upperBound
        if let first, first.start < range.lowerBound {
            if value != nil && first.value == value! {
                newStart = first.start
            } else {
                pieces.append(Extent(start: first.start, end: range.lowerBound, value: first.value))
            }
        }
        if let value {
            if let last, last.end > range.upperBound, last.value == value { newEnd = last.end }
            pieces.append(Extent(start: newStart, end: newEnd, value: value))
        }
        if let last, last.end > newEnd {
            pieces.append(Extent(start: max(range.upperBound, last.start), end: last.end, value: last.value))
        }
        insert(pieces, atChunk: startChunk, index: startIndex, touchedThrough: min(c, chunks.count - 1))
    }

    /// The value at one block, if any.
    public func value(at block: UInt64) -> Value? {
        var found: Value?
        forEach(in: block..<block + 1) { _, value in found = value }
        return found
    }

    /// Calls `body` for each run of `range` in order: mapped runs with their
    /// value, holes with nil. The runs cover the range exactly.
    public func forEach(in range: Range<UInt64>, _ body: (Range<UInt64>, Value?) -> Void) {
        guard !range.isEmpty else { return }
        var (c, i) = position(firstEndingAtOrAfter: range.lowerBound + 1)
        var at = range.lowerBound
        while at < range.upperBound && c < chunks.count {
            let extent = chunks[c][i]
            if extent.start >= range.upperBound { break }
            if extent.start > at {
                body(at..<extent.start, nil)
                at = extent.start
            }
            let end = min(extent.end, range.upperBound)
            body(at..<end, extent.value)
            at = end
            i += 1
            if i == chunks[c].count {
                c += 1
                i = 0
            }
        }
        if at < range.upperBound { body(at..<range.upperBound, nil) }
    }

    /// The extents within `range`, clipped to it.
    public func extents(in range: Range<UInt64>) -> [Extent] {
        var found: [Extent] = []
        forEach(in: range) { run, value in
            if let value { found.append(Extent(start: run.lowerBound, end: run.upperBound, value: value)) }
        }
        return found
    }

    // MARK: - Chunks

    /// The chunk and index of the first extent whose end is at least `block`
    /// (`chunks.count, 0` when there is none).
    private func position(firstEndingAtOrAfter block: UInt64) -> (Int, Int) {
        guard !chunks.isEmpty else { return (0, 0) }
        // The last chunk starting before the block: extents of earlier chunks end at or before its
        // start, so before the block; an extent ending at or after it is there or in the next chunk.
        // (Not "at or before": the previous chunk's last extent may end exactly where a chunk starts.)
        var low = 0, high = firstStarts.count
        while low < high {
            let middle = (low + high) / 2
            if firstStarts[middle] < block { low = middle + 1 } else { high = middle }
        }
        let c = max(low - 1, 0)
        let chunk = chunks[c]
        var lo = 0, hi = chunk.count
        while lo < hi {
            let middle = (lo + hi) / 2
            if chunk[middle].end < block { lo = middle + 1 } else { hi = middle }
        }
        return lo < chunk.count ? (c, lo) : (c + 1, 0)
    }

    /// Puts `pieces` at a position emptied by `set`, then drops emptied chunks,
    /// splits one grown too large and refreshes the first starts of those touched.
    private mutating func insert(_ pieces: [Extent], atChunk c: Int, index i: Int, touchedThrough lastTouched: Int) {
        count += pieces.count
        var target = c
        var index = i
        if target == chunks.count {
            if pieces.isEmpty { return dropEmptyChunks(from: c, through: lastTouched) }
            if let lastChunk = chunks.indices.last, chunks[lastChunk].count < Self.chunkLimit {
                target = lastChunk
                index = chunks[lastChunk].count
            } else {
                chunks.append([])
                firstStarts.append(0)
            }
        }
        chunks[target].insert(contentsOf: pieces, at: index)
        if chunks[target].count > Self.chunkLimit {
            let half = chunks[target].count / 2
            let upper = Array(chunks[target][half...])
            chunks[target].removeSubrange(half...)
            chunks.insert(upper, at: target + 1)
            firstStarts.insert(upper[0].start, at: target + 1)
        }
        dropEmptyChunks(from: min(c, target), through: max(lastTouched, target) + 1)
    }

    private mutating func dropEmptyChunks(from lower: Int, through upper: Int) {
        var k = min(upper, chunks.count - 1)
        while k >= lower && k >= 0 {
            if chunks[k].isEmpty {
                chunks.remove(at: k)
                firstStarts.remove(at: k)
            } else {
                firstStarts[k] = chunks[k][0].start
            }
            k -= 1
        }
    }
}

extension ExtentMap: Sendable where Value: Sendable {}
extension ExtentMap.Extent: Sendable where Value: Sendable {}
