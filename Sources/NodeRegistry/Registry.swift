import SQLite
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// The node registry: the volumes this node created, in SQLite, each change
/// durable before it returns. Every `keel` invocation opens its own.
public final class Registry {
    public static let schemaVersion: Int64 = 6

    public let layout: NodeLayout
    let database: Database

    public enum Failure: Error, CustomStringConvertible, Equatable {
        case cannotCreate(path: String, reason: String, denied: Bool)
        case exists(String)
        case newerSchema(Int64)
        case nodeExists(String)
        case nodeInUse(node: String, volumes: [String])

        public var description: String {
            switch self {
            case .cannotCreate(let path, let reason, let denied):
                return "cannot create \(path): \(reason); " + (denied ? "run as root or " : "")
                    + "pass another --state-dir (or set KEEL_STATE_DIR)"
            case .exists(let name):
                return "a volume named \(name) already exists; pick another name or remove it with 'keel volume rm \(name)'"
            case .nodeExists(let name):
                return "a node named \(name) is known already; remove it first with 'keel node rm \(name)'"
            case .nodeInUse(let node, let volumes):
                return "node \(node) holds the engine or replicas of \(volumes.joined(separator: ", ")); remove those volumes first"
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
                try database.execute(Self.snapshotsTable)
            }
            if (1...3).contains(version) {
                // Version 3 knew no other nodes: its volumes run on this one.
                try database.execute("""
                    ALTER TABLE volumes ADD COLUMN engine_port INTEGER NOT NULL DEFAULT 0;
                    ALTER TABLE replicas ADD COLUMN node TEXT;
                    \(Self.nodesTables)
                    """)
            }
            if (1...4).contains(version) {
                // Version 4 named a replica by its position, which a move changes: its slot keeps that name.
                try database.execute("""
                    ALTER TABLE replicas ADD COLUMN slot INTEGER NOT NULL DEFAULT 0;
                    UPDATE replicas SET slot = position;
                    ALTER TABLE replicas ADD COLUMN role TEXT NOT NULL DEFAULT 'member';
                    \(Self.migrationsTable)
                    """)
            }
            if (1...5).contains(version) {
                // Version 5 ran every engine under its first unit: a live migration under systemd alternates two.
                try database.execute("""
                    ALTER TABLE volumes ADD COLUMN engine_unit TEXT NOT NULL DEFAULT '';
                    PRAGMA user_version = \(Self.schemaVersion);
                    """)
            }
            guard version == 0 else { return }
            try database.execute("""
                CREATE TABLE volumes (
                    name TEXT PRIMARY KEY,
                    id TEXT NOT NULL DEFAULT '',
                    size INTEGER NOT NULL,
                    connections INTEGER NOT NULL,
                    runner TEXT NOT NULL,
                    created_at INTEGER NOT NULL,
                    engine_port INTEGER NOT NULL DEFAULT 0,
                    engine_unit TEXT NOT NULL DEFAULT ''
                );
                CREATE TABLE replicas (
                    volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
                    position INTEGER NOT NULL,
                    address TEXT NOT NULL,
                    directory TEXT,
                    node TEXT,
                    slot INTEGER NOT NULL DEFAULT 0,
                    role TEXT NOT NULL DEFAULT 'member',
                    PRIMARY KEY (volume, position)
                );
                \(Self.snapshotsTable)
                \(Self.nodesTables)
                \(Self.migrationsTable)
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

    /// The other nodes this one knows by name (`keel node add`), and for each
    /// volume the ordered list of nodes its engine may run on.
    private static let nodesTables = """
        CREATE TABLE nodes (
            name TEXT PRIMARY KEY,
            address TEXT NOT NULL,
            added_at INTEGER NOT NULL
        );
        CREATE TABLE engine_nodes (
            volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            node TEXT NOT NULL,
            PRIMARY KEY (volume, position)
        );
        """

    public func nodes() throws -> [NodeRecord] {
        try database.query("SELECT name, address, added_at FROM nodes ORDER BY name").map {
            NodeRecord(name: $0[0].text ?? "", address: $0[1].text ?? "", addedAt: $0[2].integer ?? 0)
        }
    }

    public func node(named name: String) throws -> NodeRecord? {
        try nodes().first { $0.name == name }
    }

    public func add(_ node: NodeRecord) throws {
        try database.transaction {
            guard try database.query("SELECT 1 FROM nodes WHERE name = ?", [.text(node.name)]).isEmpty else {
                throw Failure.nodeExists(node.name)
            }
            try database.query("INSERT INTO nodes (name, address, added_at) VALUES (?, ?, ?)",
                               [.text(node.name), .text(node.address), .integer(node.addedAt)])
        }
    }

    /// Forgets a node no volume uses; true if it was there.
    @discardableResult
    public func removeNode(named name: String) throws -> Bool {
        try database.transaction {
            let users = try database.query("""
                SELECT volume FROM engine_nodes WHERE node = ?1 UNION SELECT volume FROM replicas WHERE node = ?1 ORDER BY 1
                """, [.text(name)]).compactMap { $0[0].text }
            guard users.isEmpty else { throw Failure.nodeInUse(node: name, volumes: users) }
            let known = try !database.query("SELECT 1 FROM nodes WHERE name = ?", [.text(name)]).isEmpty
            try database.query("DELETE FROM nodes WHERE name = ?", [.text(name)])
            return known
        }
    }

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
            "SELECT size, connections, runner, created_at, id, engine_port, engine_unit FROM volumes WHERE name = ?", [.text(name)]).first,
              let size = row[0].integer, let connections = row[1].integer, let runner = row[2].text,
              let createdAt = row[3].integer, let id = row[4].text else { return nil }
        let replicas = try database.query(
            "SELECT address, directory, node, slot, role FROM replicas WHERE volume = ? ORDER BY position", [.text(name)]
        ).map {
            ReplicaRecord(address: $0[0].text ?? "", directory: $0[1].text, node: $0[2].text, slot: Int($0[3].integer ?? 0),
                          role: ReplicaRecord.Role(rawValue: $0[4].text ?? "") ?? .member)
        }
        let engineNodes = try database.query(
            "SELECT node FROM engine_nodes WHERE volume = ? ORDER BY position", [.text(name)]).compactMap { $0[0].text }
        return VolumeRecord(name: name, id: id, size: UInt64(size), replicas: replicas, connections: Int(connections),
                            runner: VolumeRecord.Runner(rawValue: runner) ?? .keel, createdAt: createdAt,
                            engineNodes: engineNodes, enginePort: Int(row[5].integer ?? 0),
                            engineUnit: VolumeRecord.EngineUnit(rawValue: row[6].text ?? "") ?? .first)
    }

    /// The unit the volume's engine runs as now (a live migration under systemd switches it).
    public func setEngineUnit(_ unit: VolumeRecord.EngineUnit, of volume: String) throws {
        try database.query("UPDATE volumes SET engine_unit = ? WHERE name = ?", [.text(unit.rawValue), .text(volume)])
    }

    public func add(_ volume: VolumeRecord) throws {
        try database.transaction {
            guard try database.query("SELECT 1 FROM volumes WHERE name = ?", [.text(volume.name)]).isEmpty else {
                throw Failure.exists(volume.name)
            }
            try database.query("""
                INSERT INTO volumes (name, id, size, connections, runner, created_at, engine_port, engine_unit)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """, [.text(volume.name), .text(volume.id), .integer(Int64(volume.size)),
                      .integer(Int64(volume.connections)), .text(volume.runner.rawValue), .integer(volume.createdAt),
                      .integer(Int64(volume.enginePort)), .text(volume.engineUnit.rawValue)])
            try insertReplicas(volume.replicas, of: volume.name)
            for (position, node) in volume.engineNodes.enumerated() {
                try database.query("INSERT INTO engine_nodes (volume, position, node) VALUES (?, ?, ?)",
                                   [.text(volume.name), .integer(Int64(position)), .text(node)])
            }
        }
    }

    /// Replaces the volume's engine nodes, in order (a migration's new node goes first).
    public func setEngineNodes(_ nodes: [String], of volume: String) throws {
        try database.transaction {
            try database.query("DELETE FROM engine_nodes WHERE volume = ?", [.text(volume)])
            for (position, node) in nodes.enumerated() {
                try database.query("INSERT INTO engine_nodes (volume, position, node) VALUES (?, ?, ?)",
                                   [.text(volume), .integer(Int64(position)), .text(node)])
            }
        }
    }

    /// Replaces the volume's replicas (a move adds and removes them).
    public func setReplicas(_ replicas: [ReplicaRecord], of volume: String) throws {
        try database.transaction {
            try database.query("DELETE FROM replicas WHERE volume = ?", [.text(volume)])
            try insertReplicas(replicas, of: volume)
        }
    }

    private func insertReplicas(_ replicas: [ReplicaRecord], of volume: String) throws {
        for (position, replica) in replicas.enumerated() {
            try database.query("""
                INSERT INTO replicas (volume, position, address, directory, node, slot, role) VALUES (?, ?, ?, ?, ?, ?, ?)
                """, [.text(volume), .integer(Int64(position)), .text(replica.address),
                      replica.directory.map { .text($0) } ?? .null, replica.node.map { .text($0) } ?? .null,
                      .integer(Int64(replica.slot)), .text(replica.role.rawValue)])
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
