import LayerStack
import ReplicaIdentity
import SQLite
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A replica's data directory: the head layer file and its metadata.
///
/// ```
/// DIR/replica.sqlite     identity, size, epoch and its engine, the chain of
///                        layers, dirty regions, the volume's membership
///                        (SQLite, WAL, synchronous=FULL)
/// DIR/layers/*.img       each layer's data, a sparse file of the volume's size
/// DIR/layers/*.map       each layer's map log (`LayerFiles`, `MapRecord`)
/// ```
/// The database appears last, by rename, so a directory that has it holds a
/// complete replica. The epoch only grows and is on disk before `claim` returns;
/// so are dirty marks and memberships before their setters return.
public final class ReplicaStore: @unchecked Sendable {
    public static let metadataName = "replica.sqlite"
    public static let schemaVersion: Int64 = 7

    public let directory: String
    public let size: UInt64
    /// Chosen at creation, never reused: how engines tell a replica from its replacement.
    public let id: String
    public var headPath: String { directory + "/layers/head.img" }

    let database: Database
    /// Guards the fields below and the database; held across SQLite's fsyncs,
    /// so the data path never takes it (the epoch it needs is `EpochFence`'s).
    private let mutex = Mutex(())
    private var currentEpoch: UInt64
    private var currentEngine: String
    private var currentVolume: VolumeIdentity

    public enum Failure: Error, CustomStringConvertible, Equatable {
        case sizeRequired(String)
        case sizeMismatch(directory: String, stored: UInt64, requested: UInt64)
        case notAReplica(String)
        case badSize(UInt64)
        /// A change asked for by an engine that does not own the replica (any more).
        case notOwner(epoch: UInt64, engine: String, current: UInt64, currentEngine: String)
        /// A membership record older than the one the replica holds.
        case staleMembership
        /// An engine of another volume asked for this replica.
        case otherVolume(String)

        public var description: String {
            switch self {
            case .sizeRequired(let dir):
                return "\(dir) holds no replica yet; pass --size to create one"
            case .sizeMismatch(let dir, let stored, let requested):
                return "the replica in \(dir) is \(stored) bytes, not \(requested); drop --size or use another directory"
            case .notAReplica(let dir):
                return "\(dir) is not empty and holds no Keel replica (no \(ReplicaStore.metadataName)); use an empty directory"
            case .badSize(let size):
                return "a replica's size must be a positive multiple of 4096, not \(size)"
            case .notOwner(let epoch, let engine, let current, let currentEngine):
                return "epoch \(epoch) of engine \(engine) does not own this replica (epoch \(current), engine \(currentEngine))"
            case .staleMembership:
                return "the replica holds a newer membership record"
            case .otherVolume(let reason):
                return reason
            }
        }
    }

    /// What a claim found.
    public enum Claim: Equatable {
        /// The epoch was newer and is now the replica's, persisted.
        case claimed
        /// The epoch is the replica's current one.
        case current
        /// The replica already belongs to a newer epoch.
        case stale(current: UInt64)
        /// Another engine claimed this very epoch first.
        case taken(engine: String)
        /// The replica belongs to another volume (the reason says which).
        case otherVolume(String)
    }

    /// Opens the replica in `directory`, creating it when absent and `size` is given.
    public static func open(directory: String, size: UInt64?) throws -> ReplicaStore {
        let metadata = directory + "/" + metadataName
        if access(metadata, F_OK) != 0 {
            guard let size else { throw Failure.sizeRequired(directory) }
            try create(directory: directory, size: size)
        }
        let store = try ReplicaStore(directory: directory)
        try store.settlePendingFreeze()
        try store.removeUnlistedLayerFiles()
        if let size, size != store.size {
            throw Failure.sizeMismatch(directory: directory, stored: store.size, requested: size)
        }
        return store
    }

    private init(directory: String) throws {
        self.directory = directory
        do {
            database = try Database(path: directory + "/" + Self.metadataName, create: false)
            try Self.upgrade(database, directory: directory)
            let rows = try database.query("SELECT size, epoch, engine, replica_id, volume, volume_id FROM replica WHERE id = 1")
            guard let row = rows.first, let size = row[0].integer, let epoch = row[1].integer,
                  let engine = row[2].text, let id = row[3].text, let volume = row[4].text,
                  let volumeID = row[5].text else {
                throw Failure.notAReplica(directory)
            }
            self.size = UInt64(size)
            self.id = id
            currentEpoch = UInt64(epoch)
            currentEngine = engine
            currentVolume = VolumeIdentity(name: volume, id: volumeID)
        } catch is SQLiteError {
            throw Failure.notAReplica(directory)
        }
    }

    public var epoch: UInt64 {
        mutex.withLock { _ in currentEpoch }
    }

    /// The epoch and the engine that holds it.
    public var owner: Owner {
        mutex.withLock { _ in Owner(epoch: currentEpoch, engine: currentEngine) }
    }

    /// The volume this replica belongs to, recorded at its first claim (empty before).
    public var volume: VolumeIdentity {
        mutex.withLock { _ in currentVolume }
    }

    /// The current claim, as the one export the replica lists.
    public var listedName: ReplicaExportName {
        mutex.withLock { _ in
            ReplicaExportName(volume: currentVolume, owner: Owner(epoch: currentEpoch, engine: currentEngine))
        }
    }

    /// Takes the replica for `owner` if its epoch is newer than any seen,
    /// durably. The same epoch stays its first claimer's: two engines that
    /// picked the same number cannot both own the replica. The first claim
    /// records the volume; a claim for another volume is refused, so an
    /// engine given the wrong address never fences another volume.
    public func claim(_ owner: Owner, volume: VolumeIdentity = VolumeIdentity(name: "")) throws -> Claim {
        precondition(owner.epoch <= Owner.maximumEpoch, "epochs are stored as signed 64-bit integers")
        return try locked {
            if let refusal = currentVolume.refusal(of: volume) { return .otherVolume(refusal) }
            if owner.epoch < currentEpoch { return .stale(current: currentEpoch) }
            if owner.epoch == currentEpoch {
                return owner.engine == currentEngine ? .current : .taken(engine: currentEngine)
            }
            let recorded = currentVolume.recording(volume)
            try database.query("UPDATE replica SET epoch = ?, engine = ?, volume = ?, volume_id = ? WHERE id = 1",
                               [.integer(Int64(owner.epoch)), .text(owner.engine), .text(recorded.name), .text(recorded.id)])
            currentEpoch = owner.epoch
            currentEngine = owner.engine
            currentVolume = recorded
            return .claimed
        }
    }

    // MARK: - Write-intent log

    /// Byte ranges the engine may have written without every replica having
    /// acknowledged them: after an engine crash, exactly what must be made identical.
    public func dirtyRanges() throws -> [ByteRange] {
        try locked {
            try database.query("SELECT offset, length FROM dirty ORDER BY offset").map {
                ByteRange(offset: UInt64($0[0].integer!), length: UInt64($0[1].integer!))
            }
        }
    }

    /// Records ranges as dirty, durably, before the engine writes into them.
    /// With `owner`, only if that epoch and engine own the replica, checked
    /// under the same lock as claims: a fenced engine can change nothing.
    public func markDirty(_ ranges: [ByteRange], owner: Owner? = nil) throws {
        try locked {
            try check(owner)
            try database.transaction {
                for range in ranges {
                    try database.query("INSERT OR REPLACE INTO dirty (offset, length) VALUES (?, ?)",
                                       [.integer(Int64(range.offset)), .integer(Int64(range.length))])
                }
            }
        }
    }

    /// Forgets every dirty range that starts inside one of `ranges`.
    public func clearDirty(_ ranges: [ByteRange], owner: Owner? = nil) throws {
        try locked {
            try check(owner)
            try database.transaction {
                for range in ranges {
                    try database.query("DELETE FROM dirty WHERE offset >= ? AND offset < ?",
                                       [.integer(Int64(range.offset)), .integer(Int64(range.offset + range.length))])
                }
            }
        }
    }

    // MARK: - Membership

    /// The replicas known to hold every acknowledged write, as the engine last recorded it.
    public func membership() throws -> Membership? {
        try locked { try readMembership() }
    }

    private func readMembership() throws -> Membership? {
            guard let row = try database.query("SELECT epoch, generation, members FROM membership WHERE id = 1").first,
                  let epoch = row[0].integer, let generation = row[1].integer, let members = row[2].text else {
                return nil
            }
            return Membership(epoch: UInt64(epoch), generation: UInt64(generation),
                              members: members.split(separator: ",").map(String.init))
    }

    /// Replaces the record unless the replica holds a newer one.
    public func setMembership(_ membership: Membership, owner: Owner? = nil) throws {
        try locked {
            try check(owner)
            if let current = try readMembership(), current.isNewer(than: membership) { throw Failure.staleMembership }
            try database.query("""
                INSERT OR REPLACE INTO membership (id, epoch, generation, members) VALUES (1, ?, ?, ?)
                """, [.integer(Int64(membership.epoch)), .integer(Int64(membership.generation)),
                      .text(membership.members.joined(separator: ","))])
        }
    }

    func check(_ owner: Owner?) throws {
        guard let owner, owner.epoch != currentEpoch || owner.engine != currentEngine else { return }
        throw Failure.notOwner(epoch: owner.epoch, engine: owner.engine, current: currentEpoch, currentEngine: currentEngine)
    }

    func locked<T>(_ body: () throws -> T) throws -> T {
        try mutex.withLock { _ in try body() }
    }

    /// Runs `body` holding the metadata lock: for test fault points that stand
    /// for a slow SQLite commit (what waits on it, and what must not).
    public func whileLocked(_ body: () -> Void) {
        mutex.withLock { _ in body() }
    }

    /// Brings an older replica's metadata to this schema: version 2 had no
    /// volume identity; version 4 named no snapshot; version 5 kept no
    /// removed snapshot's name; version 6 did not tell an unsealed snapshot
    /// (its snapshots are taken as sealed); before version 4 the
    /// head had no map log. The head is
    /// the bottom layer, whose file is the truth where its map records
    /// nothing: its log starts empty (created and synced before the schema
    /// says it exists; a crash before the commit does it again). The replica
    /// opens as a chain of one layer.
    private static func upgrade(_ database: Database, directory: String) throws {
        let columns = try database.query("PRAGMA table_info(replica)").compactMap { $0[1].text }
        if !columns.contains("volume") {
            try database.transaction {
                try database.execute("""
                    ALTER TABLE replica ADD COLUMN volume TEXT NOT NULL DEFAULT '';
                    ALTER TABLE replica ADD COLUMN volume_id TEXT NOT NULL DEFAULT '';
                    """)
                try database.query("UPDATE replica SET schema = 3 WHERE id = 1")
            }
        }
        let layerColumns = try database.query("PRAGMA table_info(layers)").compactMap { $0[1].text }
        if !layerColumns.contains("map") { try addMapLogs(database, directory: directory) }
        if !layerColumns.contains("name") {
            try database.transaction {
                try database.execute("""
                    ALTER TABLE layers ADD COLUMN name TEXT;
                    ALTER TABLE layers ADD COLUMN frozen INTEGER;
                    CREATE UNIQUE INDEX layer_names ON layers(name);
                    """)
            }
        }
        if !layerColumns.contains("unsealed") {
            try database.execute("ALTER TABLE layers ADD COLUMN unsealed INTEGER NOT NULL DEFAULT 0")
        }
        try database.execute(pendingFreezeTable)
        try database.execute(removedSnapshotsTable)
        try database.query("UPDATE replica SET schema = ? WHERE id = 1 AND schema < ?", [.integer(schemaVersion), .integer(schemaVersion)])
    }

    private static func addMapLogs(_ database: Database, directory: String) throws {
        let heads = try database.query("SELECT id, file FROM layers").compactMap { row in
            row[1].text.map { (id: row[0].integer!, file: $0) }
        }
        var maps: [(id: Int64, map: String)] = []
        for head in heads {
            let map = head.file.hasSuffix(".img") ? String(head.file.dropLast(4)) + ".map" : head.file + ".map"
            let path = directory + "/" + map
            let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw SystemError.current("create \(path)") }
            defer { Glibc.close(fd) }
            try retryingOnInterrupt("fsync \(path)") { fsync(fd) }
            maps.append((head.id, map))
        }
        try syncDirectory(directory + "/layers")
        try database.transaction {
            try database.execute("ALTER TABLE layers ADD COLUMN map TEXT")
            for (id, map) in maps { try database.query("UPDATE layers SET map = ? WHERE id = ?", [.text(map), .integer(id)]) }
            try database.query("UPDATE replica SET schema = 4 WHERE id = 1")
        }
    }

    /// A freeze prepared and not yet committed (`PendingFreeze`): at most one.
    private static let pendingFreezeTable = """
        CREATE TABLE IF NOT EXISTS pending_freeze (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            layer INTEGER NOT NULL,
            file TEXT NOT NULL,
            map TEXT NOT NULL,
            name TEXT NOT NULL,
            time INTEGER NOT NULL);
        """

    /// Names of snapshots merged away, so that a removal stopped half way
    /// is finished, not undone, by the next engine (`ChainReconciliation`).
    private static let removedSnapshotsTable = """
        CREATE TABLE IF NOT EXISTS removed_snapshots (
            name TEXT PRIMARY KEY,
            time INTEGER NOT NULL);
        """

    private static func create(directory: String, size: UInt64) throws {
        guard size > 0, size % 4096 == 0, size <= UInt64(Int64.max) else { throw Failure.badSize(size) }
        try makeDirectories(directory, mode: 0o700)
        let entries = try listDirectory(directory).filter { $0 != "layers" && !$0.hasPrefix(metadataName) }
        guard entries.isEmpty else { throw Failure.notAReplica(directory) }
        try makeDirectories(directory + "/layers", mode: 0o700)

        for name in ["head.img", "head.map"] { unlink(directory + "/layers/" + name) }
        _ = try LayerFiles.create(dataPath: directory + "/layers/head.img", mapPath: directory + "/layers/head.map", size: size)

        let temporary = directory + "/" + metadataName + ".new"
        unlink(temporary)
        do {
            let database = try Database(path: temporary, create: true)
            try database.transaction {
                try database.execute("""
                    CREATE TABLE replica (
                        id INTEGER PRIMARY KEY CHECK (id = 1),
                        schema INTEGER NOT NULL,
                        size INTEGER NOT NULL,
                        replica_id TEXT NOT NULL,
                        epoch INTEGER NOT NULL,
                        engine TEXT NOT NULL DEFAULT '',
                        volume TEXT NOT NULL DEFAULT '',
                        volume_id TEXT NOT NULL DEFAULT '',
                        state TEXT NOT NULL,
                        created TEXT NOT NULL DEFAULT (datetime('now')));
                    CREATE TABLE layers (
                        id INTEGER PRIMARY KEY,
                        file TEXT NOT NULL UNIQUE,
                        map TEXT,
                        parent INTEGER REFERENCES layers(id),
                        kind TEXT NOT NULL CHECK (kind IN ('head', 'snapshot')),
                        created TEXT NOT NULL DEFAULT (datetime('now')),
                        name TEXT UNIQUE,
                        frozen INTEGER,
                        unsealed INTEGER NOT NULL DEFAULT 0);
                    CREATE TABLE dirty (
                        offset INTEGER PRIMARY KEY,
                        length INTEGER NOT NULL);
                    \(pendingFreezeTable)
                    \(removedSnapshotsTable)
                    CREATE TABLE membership (
                        id INTEGER PRIMARY KEY CHECK (id = 1),
                        epoch INTEGER NOT NULL,
                        generation INTEGER NOT NULL,
                        members TEXT NOT NULL);
                    """)
                try database.query("""
                    INSERT INTO replica (id, schema, size, replica_id, epoch, state) VALUES (1, ?, ?, ?, 0, 'clean')
                    """, [.integer(schemaVersion), .integer(Int64(size)), .text(newIdentifier())])
                try database.query("INSERT INTO layers (file, map, kind) VALUES ('layers/head.img', 'layers/head.map', 'head')")
            }
            // Back to a single file, so that the rename below moves all of it.
            try database.execute("PRAGMA journal_mode=DELETE")
        }
        guard rename(temporary, directory + "/" + metadataName) == 0 else {
            throw SystemError.current("rename \(temporary)")
        }
        try syncDirectory(directory)
    }

    /// 128 random bits in hex.
    private static func newIdentifier() -> String {
        var bytes = [UInt8](repeating: 0, count: 16)
        for i in bytes.indices { bytes[i] = UInt8.random(in: 0...255) }
        return bytes.map { byte in
            let hex = String(byte, radix: 16)
            return hex.count == 1 ? "0" + hex : hex
        }.joined()
    }

    static func listDirectory(_ path: String) throws -> [String] {
        guard let dir = opendir(path) else { throw SystemError.current("opendir \(path)") }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    static func syncDirectory(_ path: String) throws {
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.current("open \(path)") }
        defer { Glibc.close(fd) }
        try retryingOnInterrupt("fsync \(path)") { fsync(fd) }
    }
}
