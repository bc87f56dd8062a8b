/// One change of a layer's map as its map log stores it, in 16 bytes:
///
///     0  start block   UInt64 little-endian
///     8  block count   UInt32 little-endian (a longer run is several records)
///    12  content       1 data, 2 zero, 3 hole (a run given back, e.g. by a merge)
///    13  format        MapRecord.format
///    14  check         UInt16 little-endian: FNV-1a of bytes 0..<14, folded
///
/// Each append has its own place (I/O threads append without a lock), so a
/// crash can leave a slot unwritten or torn before good ones: replay applies
/// every record that checks, in order, and skips the others (none was
/// acknowledged: a write is answered only after its record is written).
public struct MapRecord: Equatable, Sendable {
    public static let size = 16
    public static let format: UInt8 = 1
    public static let maxBlocks = UInt64(UInt32.max)

    public var start: UInt64
    public var count: UInt32
    /// nil: the run becomes a hole.
    public var content: BlockContent?

    public init(start: UInt64, count: UInt32, content: BlockContent?) {
        self.start = start
        self.count = count
        self.content = content
    }

    /// The records for a run of any length.
    public static func records(_ blocks: Range<UInt64>, _ content: BlockContent?) -> [MapRecord] {
        stride(from: blocks.lowerBound, to: blocks.upperBound, by: Int(maxBlocks)).map { start in
            MapRecord(start: start, count: UInt32(min(maxBlocks, blocks.upperBound - start)), content: content)
        }
    }

    public func encode(into bytes: UnsafeMutableRawBufferPointer) {
        precondition(bytes.count >= Self.size)
        bytes.storeBytes(of: start.littleEndian, toByteOffset: 0, as: UInt64.self)
        bytes.storeBytes(of: count.littleEndian, toByteOffset: 8, as: UInt32.self)
        bytes[12] = content?.rawValue ?? 3
        bytes[13] = Self.format
        bytes.storeBytes(of: Self.check(UnsafeRawBufferPointer(bytes)).littleEndian, toByteOffset: 14, as: UInt16.self)
    }

    /// The record in `bytes`, or nil when they hold none (torn, zero, another format).
    public init?(decoding bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= Self.size, bytes[13] == Self.format,
              UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 14, as: UInt16.self)) == Self.check(bytes)
        else { return nil }
        let code = bytes[12]
        guard code == 3 || BlockContent(rawValue: code) != nil else { return nil }
        start = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        count = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        content = BlockContent(rawValue: code)
    }

    public var blocks: Range<UInt64> { start..<start + UInt64(count) }

    private static func check(_ bytes: UnsafeRawBufferPointer) -> UInt16 {
        var hash: UInt32 = 2_166_136_261
        for i in 0..<14 { hash = (hash ^ UInt32(bytes[i])) &* 16_777_619 }
        return UInt16(truncatingIfNeeded: hash ^ (hash >> 16))
    }

    /// A layer's map from its log, and the slots up to the last good record
    /// (what follows is a torn or unwritten tail).
    public static func replay(_ log: UnsafeRawBufferPointer) -> (map: ExtentMap<BlockContent>, slots: Int) {
        var map = ExtentMap<BlockContent>()
        var slots = 0
        var slot = 0
        while (slot + 1) * size <= log.count {
            if let record = MapRecord(decoding: UnsafeRawBufferPointer(rebasing: log[slot * size..<(slot + 1) * size])) {
                map.set(record.blocks, to: record.content)
                slots = slot + 1
            }
            slot += 1
        }
        return (map, slots)
    }
}
