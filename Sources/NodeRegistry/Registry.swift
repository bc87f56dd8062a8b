import SQLite
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// The node registry: the volumes this node created, in SQLite, each change
/// durable before it returns. Every `keel` invocation opens its own.
public final class Registry {
    public static let schemaVersion: Int64 = 3

    public let layout: NodeLayout
    private let database: Database

    public enum Failure: Error, CustomStringConvertible, Equatable {
        case cannotCreate(path: String, reason: String, denied: Bool)
        case exists(String)
        case newerSchema(Int64)

        public var description: String {
            switch self {
            case .cannotCreate(let path, let reason, let denied):
                return "cannot create \(path): \(reason); " + (denied ? "run as root or " : "")
                    + "pass another --state-dir (or set KEEL_STATE_DIR)"
            case .exists(let name):
                return "a volume named \(name) already exists; pick another name or remove it with 'keel volume rm \(name)'"
            case .newerSchema(let version):
                return "the registry has schema \(version), newer than this keel knows (\(Registry.schemaVersion)); upgrade keel"
            }
        }
    }

    /// Opens the registry in `layout`'s state directory, creating the directories and the schema when absent.
    public init(layout: NodeLayout) throws {
        self.layout = layout
        for directory in [layout.stateDirectory, layout.runDirectory, layout.logDirectory] {
            do { try makeDirectories(directory, mode: 0o700) } catch let error as SystemError {
                throw Failure.cannotCreate(path: directory, reason: String(cString: strerror(error.errno)),
                                           denied: error.errno == EACCES || error.errno == EPERM)
            }
        }
        database = try Database(path: layout.registryPath, create: true)
        // Its write-ahead log and shared memory files take the database file's mode.
        chmod(layout.registryPath, 0o600)
        try database.transaction {
            let version = try database.query("PRAGMA user_version").first?.first?.integer ?? 0
            if version > Self.schemaVersion { throw Failure.newerSchema(version) }
            if version == 1 {
                // Version 1 had no volume identities: those volumes keep an empty one.
                try database.execute("ALTER TABLE volumes ADD COLUMN id TEXT NOT NULL DEFAULT '';")
            }
            if version == 1 || version == 2 {
                // Version 2 knew no snapshots: they are learnt at the next snapshot command.
                try database.execute(Self.snapshotsTable + "PRAGMA user_version = \(Self.schemaVersion);")
            }
            guard version == 0 else { return }
            try database.execute("""
                CREATE TABLE volumes (
                    name TEXT PRIMARY KEY,
                    id TEXT NOT NULL DEFAULT '',
                    size INTEGER NOT NULL,
                    connections INTEGER NOT NULL,
                    runner TEXT NOT NULL,
                    created_at INTEGER NOT NULL
                );
                CREATE TABLE replicas (
                    volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
                    position INTEGER NOT NULL,
                    address TEXT NOT NULL,
                    directory TEXT,
                    PRIMARY KEY (volume, position)
                );
                \(Self.snapshotsTable)
                PRAGMA user_version = \(Self.schemaVersion);
                """)
        }
    }

    /// The volume's snapshots as the last snapshot command saw them on its
    /// engine: what `keel snapshot ls` shows while no engine runs. The
    /// replicas hold the truth; this is the node's catalog of it.
    private static let snapshotsTable = """
        CREATE TABLE snapshots (
            volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            name TEXT NOT NULL,
            created INTEGER NOT NULL,
            own_bytes INTEGER NOT NULL,
            seen_at INTEGER NOT NULL,
            PRIMARY KEY (volume, position)
        );
        """

    /// Replaces the volume's snapshots (oldest first) with those an engine just listed.
    public func setSnapshots(_ snapshots: [SnapshotEntry], of volume: String, seenAt: Int64) throws {
        try database.transaction {
            try database.query("DELETE FROM snapshots WHERE volume = ?", [.text(volume)])
            for (position, snapshot) in snapshots.enumerated() {
                try database.query("""
                    INSERT INTO snapshots (volume, position, name, created, own_bytes, seen_at) VALUES (?, ?, ?, ?, ?, ?)
                    """, [.text(volume), .integer(Int64(position)), .text(snapshot.name), .integer(snapshot.created),
                          .integer(Int64(snapshot.ownBytes)), .integer(seenAt)])
            }
        }
    }

    /// The volume's snapshots as last seen, oldest first, and when they were seen (nil: never).
    public func snapshots(of volume: String) throws -> (snapshots: [SnapshotEntry], seenAt: Int64?) {
        let rows = try database.query(
            "SELECT name, created, own_bytes, seen_at FROM snapshots WHERE volume = ? ORDER BY position", [.text(volume)])
        let entries = rows.map { row in
            SnapshotEntry(name: row[0].text ?? "", created: row[1].integer ?? 0, ownBytes: UInt64(row[2].integer ?? 0))
        }
        return (entries, rows.first?[3].integer)
    }

    public func volumes() throws -> [VolumeRecord] {
        try database.query("SELECT name FROM volumes ORDER BY name").compactMap { row in
            try row.first?.text.flatMap { try volume(named: $0) }
        }
    }

    public func volume(named name: String) throws -> VolumeRecord? {
        guard let row = try database.query(
            "SELECT size, connections, runner, created_at, id FROM volumes WHERE name = ?", [.text(name)]).first,
              let size = row[0].integer, let connections = row[1].integer, let runner = row[2].text,
              let createdAt = row[3].integer, let id = row[4].text else { return nil }
        let replicas = try database.query(
            "SELECT address, directory FROM replicas WHERE volume = ? ORDER BY position", [.text(name)]
        ).map { ReplicaRecord(address: $0[0].text ?? "", directory: $0[1].text) }
        return VolumeRecord(name: name, id: id, size: UInt64(size), replicas: replicas, connections: Int(connections),
                            runner: VolumeRecord.Runner(rawValue: runner) ?? .keel, createdAt: createdAt)
    }

    public func add(_ volume: VolumeRecord) throws {
        try database.transaction {
            guard try database.query("SELECT 1 FROM volumes WHERE name = ?", [.text(volume.name)]).isEmpty else {
                throw Failure.exists(volume.name)
            }
            try database.query("""
                INSERT INTO volumes (name, id, size, connections, runner, created_at) VALUES (?, ?, ?, ?, ?, ?)
                """, [.text(volume.name), .text(volume.id), .integer(Int64(volume.size)),
                      .integer(Int64(volume.connections)), .text(volume.runner.rawValue), .integer(volume.createdAt)])
            for (position, replica) in volume.replicas.enumerated() {
                try database.query("INSERT INTO replicas (volume, position, address, directory) VALUES (?, ?, ?, ?)",
                                   [.text(volume.name), .integer(Int64(position)), .text(replica.address),
                                    replica.directory.map { .text($0) } ?? .null])
            }
        }
    }

    /// Forgets a volume; true if it was there.
    @discardableResult
    public func remove(named name: String) throws -> Bool {
        try database.transaction {
            let known = try !database.query("SELECT 1 FROM volumes WHERE name = ?", [.text(name)]).isEmpty
            try database.query("DELETE FROM volumes WHERE name = ?", [.text(name)])
            return known
        }
    }
}
