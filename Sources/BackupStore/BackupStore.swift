import Foundation

public struct BackupStoreError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A store of backups on a target: its config, backups, maps, blocks and locks (docs/backups.md).
public final class BackupStore: @unchecked Sendable {
    public let target: BackupTarget
    public let config: StoreConfig

    init(target: BackupTarget, config: StoreConfig) {
        self.target = target
        self.config = config
    }

    /// The store on the target; `create` makes an empty one (its config) when the target holds none.
    public static func open(_ target: BackupTarget, create: Bool = false) throws -> BackupStore {
        if let bytes = try target.get(StoreKey.config) {
            return BackupStore(target: target, config: try decodeConfig(bytes, target: target))
        }
        guard create else {
            throw BackupStoreError("\(target.url) holds no backup store (no \(StoreKey.config)); check the URL, or make one with keel backup create")
        }
        let config = StoreConfig()
        // Two first backups at once: one config wins, both use it.
        if try !target.putIfAbsent(StoreKey.config, try encodeJSON(config)) {
            return try open(target)
        }
        return BackupStore(target: target, config: config)
    }

    static func decodeConfig(_ bytes: [UInt8], target: BackupTarget) throws -> StoreConfig {
        struct Versioned: Decodable { var format: Int }
        guard let versioned = try? JSONDecoder().decode(Versioned.self, from: Data(bytes)) else {
            throw BackupStoreError("\(target.url): \(StoreKey.config) is not a Keel backup store's config")
        }
        guard versioned.format == StoreConfig.currentFormat else {
            throw BackupStoreError("\(target.url) is a backup store of format \(versioned.format); this keel reads format \(StoreConfig.currentFormat): use a keel that knows it")
        }
        let config = try JSONDecoder().decode(StoreConfig.self, from: Data(bytes))
        guard config.hash == "sha256", config.compression == "zstd", config.blockSize > 0, config.blockSize % 4096 == 0 else {
            throw BackupStoreError("\(target.url): the store's config (\(config.hash), \(config.compression), \(config.blockSize)) is not one this keel reads")
        }
        return config
    }

    // MARK: - Backups

    /// Every complete backup (of `volume`, if given), oldest first (ids begin with their time, to the millisecond).
    public func backups(of volume: String? = nil) throws -> [BackupSummary] {
        try target.list(StoreKey.backups).compactMap { entry -> BackupSummary? in
            guard let id = StoreKey.backupID(fromKey: entry.key), let summary = try? summary(id) else { return nil }
            return volume == nil || summary.volume == volume ? summary : nil
        }.sorted { $0.id < $1.id }
    }

    public func summary(_ id: String) throws -> BackupSummary {
        guard BackupID.isValid(id), let bytes = try target.get(StoreKey.backup(id)) else {
            throw BackupStoreError("no backup \(id) in \(target.url); see keel backup ls --target \(target.url)")
        }
        do { return try JSONDecoder().decode(BackupSummary.self, from: Data(bytes)) } catch {
            throw BackupStoreError("\(target.url): backup \(id)'s summary is unreadable: \(error)")
        }
    }

    public func map(_ id: String) throws -> BlockMap {
        guard let bytes = try target.get(StoreKey.map(id)) else {
            throw BackupStoreError("\(target.url): backup \(id) has no block map (\(StoreKey.map(id)) is missing)")
        }
        do { return try JSONDecoder().decode(BlockMap.self, from: Data(try BlockCodec.decompressFrame(bytes))) } catch {
            throw BackupStoreError("\(target.url): backup \(id)'s block map is unreadable: \(error)")
        }
    }

    /// Removes a backup: its summary first (it is no longer listed), then its map. Its blocks stay until `gc`.
    public func remove(_ id: String) throws {
        _ = try summary(id)
        try target.delete([StoreKey.backup(id)])
        try target.makeDurable()
        try target.delete([StoreKey.map(id)])
    }

    // MARK: - Blocks

    /// A block's bytes, checked against its hash.
    public func block(_ hash: BlockHash, length: Int) throws -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 16)
        defer { buffer.deallocate() }
        try block(hash, into: buffer)
        return Array(buffer)
    }

    /// Fills `buffer` with a block (its whole length), checked against its hash.
    public func block(_ hash: BlockHash, into buffer: UnsafeMutableRawBufferPointer) throws {
        guard let stored = try target.get(StoreKey.block(hash)) else {
            throw BackupStoreError("\(target.url): block \(hash) is missing")
        }
        do { try BlockCodec.decompress(stored, into: buffer) } catch {
            throw BackupStoreError("\(target.url): block \(hash) is corrupt: \(error)")
        }
        guard BlockHash(of: UnsafeRawBufferPointer(buffer)) == hash else {
            throw BackupStoreError("\(target.url): block \(hash) is corrupt: its content hashes otherwise")
        }
    }

    // MARK: - Locks

    /// Locks are leases: a holder that dies lets go at the expiry.
    static let lockLease: Int64 = 15 * 60

    func lockRecord(_ holder: String, now: Int64 = Int64(Date().timeIntervalSince1970)) throws -> [UInt8] {
        try encodeJSON(StoreLock(holder: holder, expires: now + Self.lockLease))
    }

    /// The live locks under `prefix` (expired ones are not).
    func liveLocks(_ prefix: String, now: Int64 = Int64(Date().timeIntervalSince1970)) throws -> [(key: String, lock: StoreLock)] {
        try target.list(prefix).compactMap { entry in
            guard let bytes = try target.get(entry.key),
                  let lock = try? JSONDecoder().decode(StoreLock.self, from: Data(bytes)), lock.expires > now else { return nil }
            return (entry.key, lock)
        }
    }
}

func encodeJSON<T: Encodable>(_ value: T) throws -> [UInt8] {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    return Array(try encoder.encode(value))
}
