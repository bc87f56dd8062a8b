/// What a snapshot may be called: it travels in export names and file-system-free records.
public enum SnapshotName {
    public static func isValid(_ name: String) -> Bool {
        (1...64).contains(name.utf8.count) && name.unicodeScalars.allSatisfy {
            $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || "-_.:".unicodeScalars.contains($0))
        }
    }

    public static let rule = "1 to 64 letters, digits, '-', '_', '.' or ':'"
}

/// The export a reader opens on a replica to read one of its snapshots:
/// `<volume>@snapshot:<name>`. It is read-only and claims nothing, so it
/// fences no engine; an engine's own export is `ReplicaExportName`.
public struct SnapshotExportName: Equatable, Sendable, CustomStringConvertible {
    public static let marker = "@snapshot:"

    public var volume: String
    public var snapshot: String

    public init(volume: String, snapshot: String) {
        self.volume = volume
        self.snapshot = snapshot
    }

    public var description: String { volume + Self.marker + snapshot }

    public init?(parsing name: String) {
        guard let at = name.lastIndex(of: "@") else { return nil }
        let rest = name[name.index(after: at)...]
        let prefix = Self.marker.dropFirst()
        guard rest.hasPrefix(prefix), rest.count > prefix.count else { return nil }
        self.init(volume: String(name[..<at]), snapshot: String(rest.dropFirst(prefix.count)))
    }
}

/// What a request's session number says on a replica: an engine's epoch, or
/// (top bit set) a snapshot reader's layer. Epochs never reach the top bit
/// (`Owner.maximumEpoch`).
public enum ReplicaSession: Equatable, Sendable {
    case engine(epoch: UInt64)
    case snapshot(layer: UInt32)

    private static let snapshotBit: UInt64 = 1 << 63

    public init(_ raw: UInt64) {
        self = raw & Self.snapshotBit != 0 ? .snapshot(layer: UInt32(truncatingIfNeeded: raw)) : .engine(epoch: raw)
    }

    public var raw: UInt64 {
        switch self {
        case .engine(let epoch): return epoch
        case .snapshot(let layer): return Self.snapshotBit | UInt64(layer)
        }
    }
}

/// `keel:changed:<older>`, the metadata context of a snapshot's export that
/// says which 4 KiB blocks were written, trimmed or zeroed after snapshot
/// `<older>` up to the snapshot read (flag 1: changed), the way qemu's
/// `qemu:dirty-bitmap:<name>` serves incremental backup tools.
public enum ChangedBlocksContext {
    public static let prefix = "keel:changed:"
    public static let changed: UInt32 = 1

    public static func name(since older: String) -> String { prefix + older }

    /// The id a replica gives the context of older snapshot `layer`
    /// (above 1, which is `base:allocation`'s).
    public static func replicaID(layer: UInt32) -> UInt32 {
        precondition(layer < UInt32.max - 2)
        return layer + 2
    }

    public static func layer(replicaID id: UInt32) -> UInt32 { id - 2 }
}
