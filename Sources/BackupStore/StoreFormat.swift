import Foundation

/// `config.json`: what every object of the store means. Written once, when the first backup makes the store.
public struct StoreConfig: Codable, Equatable, Sendable {
    public static let currentFormat = 1
    /// 2 MiB: large enough that a 1 TiB volume's map is 512 Ki entries and an object store's
    /// per-request cost is small against the transfer; small enough that a 4 KiB write
    /// changes 2 MiB of backup, and that a changed-block view at 4 KiB rounds up little.
    public static let defaultBlockSize = 2 << 20

    public var format: Int
    public var blockSize: Int
    public var hash: String
    public var compression: String

    public init(blockSize: Int = StoreConfig.defaultBlockSize) {
        format = Self.currentFormat
        self.blockSize = blockSize
        hash = "sha256"
        compression = "zstd"
    }
}

/// `backups/ID.json`: one backup, written last: a backup is listed once this exists, and its map and blocks are durable.
public struct BackupSummary: Codable, Equatable, Sendable {
    public var format: Int
    public var id: String
    public var volume: String
    /// The volume's size in bytes at the snapshot.
    public var size: UInt64
    public var snapshot: String
    /// Whether `keel backup create` took the snapshot (it removes it once a newer backup of the volume has its own).
    public var snapshotTakenForBackup: Bool
    /// Seconds since the epoch, UTC.
    public var created: Int64
    public var parent: String?
    public var blockSize: Int
    /// Blocks the map names (not all-zero), and how many of those this backup was the first to store.
    public var blocks: Int
    public var newBlocks: Int
    /// Bytes read from the snapshot, and bytes written to the target (compressed), by this backup.
    public var bytesRead: UInt64
    public var bytesSent: UInt64
    /// Whether only the blocks changed since the parent's snapshot were read.
    public var incremental: Bool
    /// The recurring schedule that made it (`keel backup schedule`), whose retention may remove it; nil: made by hand.
    public var schedule: String?
}

/// `maps/ID.json.zst`: the volume's whole block map at the snapshot (blocks not named are all zero),
/// so that removing any backup never breaks another.
public struct BlockMap: Codable, Equatable, Sendable {
    public struct Entry: Codable, Equatable, Sendable {
        public var index: Int
        public var hash: BlockHash
        public init(index: Int, hash: BlockHash) {
            self.index = index
            self.hash = hash
        }
    }

    public var id: String
    public var size: UInt64
    public var blockSize: Int
    public var blocks: [Entry]

    public init(id: String, size: UInt64, blockSize: Int, blocks: [Entry]) {
        self.id = id
        self.size = size
        self.blockSize = blockSize
        self.blocks = blocks
    }

    public var blockCount: Int { Int((size + UInt64(blockSize) - 1) / UInt64(blockSize)) }

    /// The length of block `index`: the last may be short.
    public func length(of index: Int) -> Int {
        Int(min(UInt64(blockSize), size - UInt64(index) * UInt64(blockSize)))
    }
}

/// Where each kind of object lives in a store.
public enum StoreKey {
    public static let config = "config.json"
    public static let backups = "backups/"
    public static let maps = "maps/"
    public static let blocks = "blocks/"
    public static let locks = "locks/"
    public static let gcLock = "locks/gc.json"

    public static func backup(_ id: String) -> String { "backups/\(id).json" }
    public static func map(_ id: String) -> String { "maps/\(id).json.zst" }
    /// 256 directories by the hash's first byte: no directory holds millions of entries.
    public static func block(_ hash: BlockHash) -> String { "blocks/\(hash.hex.prefix(2))/\(hash.hex)" }
    public static func backupLock(_ id: String) -> String { "locks/backup-\(id).json" }

    public static func backupID(fromKey key: String) -> String? {
        guard key.hasPrefix(backups), key.hasSuffix(".json") else { return nil }
        return String(key.dropFirst(backups.count).dropLast(".json".count))
    }

    public static func mapID(fromKey key: String) -> String? {
        guard key.hasPrefix(maps), key.hasSuffix(".json.zst") else { return nil }
        return String(key.dropFirst(maps.count).dropLast(".json.zst".count))
    }

    public static func blockHash(fromKey key: String) -> BlockHash? {
        guard key.hasPrefix(blocks) else { return nil }
        return BlockHash(hex: String(key.split(separator: "/").last ?? ""))
    }
}

/// A lock object: who holds it and until when (a holder that died lets go at the expiry).
public struct StoreLock: Codable, Sendable {
    public var holder: String
    public var expires: Int64
    public init(holder: String, expires: Int64) {
        self.holder = holder
        self.expires = expires
    }
}

/// A backup's id: its UTC time to the millisecond and 24 random bits, so that ids sort by time and two backups never collide.
public enum BackupID {
    public static func make(at date: Date = Date()) -> String {
        let format = DateFormatter()
        format.locale = Locale(identifier: "en_US_POSIX")
        format.timeZone = TimeZone(identifier: "UTC")
        format.dateFormat = "yyyyMMdd'T'HHmmssSSS'Z'"
        return "bk-" + format.string(from: date) + "-" + String(format: "%06x", UInt32.random(in: 0 ..< (1 << 24)))
    }

    public static func isValid(_ id: String) -> Bool {
        !id.isEmpty && id.count <= 64 && id.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }
    }
}

/// The name of a recurring backup schedule: part of its systemd units' names and of its backups' records.
public enum ScheduleName {
    public static let rule = "1 to 32 lowercase letters, digits, '_' or '-', starting with a letter or digit"

    public static func isValid(_ name: String) -> Bool {
        (1 ... 32).contains(name.count) && name.first.map { $0.isLetter || $0.isNumber } == true
            && name.allSatisfy { $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "_" || $0 == "-") }
    }
}
