/// Who may change a replica: the engine that claimed it, and the epoch it claimed it with.
public struct Owner: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var epoch: UInt64
    public var engine: String

    public init(epoch: UInt64, engine: String) {
        self.epoch = epoch
        self.engine = engine
    }

    public var description: String { "epoch \(epoch) of engine \(engine.isEmpty ? "(unnamed)" : engine)" }

    /// The largest epoch a replica accepts: it is stored as a signed 64-bit SQLite integer.
    public static let maximumEpoch = UInt64(Int64.max)
}
