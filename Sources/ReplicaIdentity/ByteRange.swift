/// A byte range of the volume.
public struct ByteRange: Hashable, Sendable, CustomStringConvertible {
    public var offset: UInt64
    public var length: UInt64

    public init(offset: UInt64, length: UInt64) {
        self.offset = offset
        self.length = length
    }

    /// The first byte after the range.
    public var end: UInt64 { offset + length }

    public var description: String { "\(offset)+\(length)" }
}
