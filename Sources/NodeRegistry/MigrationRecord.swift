import SQLite

/// A volume's migration as `keel migrate status` shows it, in the Cinder specs' terms: one
/// per volume, the last one's result kept (with its time and error) until the next starts.
public struct MigrationRecord: Equatable, Sendable {
    public enum Status: String, Sendable, CaseIterable {
        case none
        /// An engine switch: the volume waits for it only at the switch itself.
        case migrating
        /// A move of the replicas: the volume stays attached, or attachable, while it copies.
        case migratingAttachable = "migrating_attachable"
        case success
        case error

        public var isRunning: Bool { self == .migrating || self == .migratingAttachable }
    }

    public var volume: String
    /// `replicas` (a move, `keel volume move`) or `engine` (`keel migrate start`).
    public var kind: String
    public var status: Status
    /// What it is doing now ("adding", "copying 3 replicas", "removing", "cancelling", "done").
    public var phase: String
    /// What it moves to, for people ("nodes d, e, f").
    public var target: String
    public var bytesDone: UInt64
    public var bytesTotal: UInt64
    public var error: String
    /// Seconds since 1970, UTC.
    public var startedAt: Int64
    public var updatedAt: Int64
    /// The process doing it, while it runs.
    public var pid: Int32
    /// `keel volume move --cancel` asked the running move to stop.
    public var cancelRequested: Bool

    public init(volume: String, kind: String, status: Status, phase: String, target: String, bytesDone: UInt64 = 0,
                bytesTotal: UInt64 = 0, error: String = "", startedAt: Int64, updatedAt: Int64, pid: Int32,
                cancelRequested: Bool = false) {
        self.volume = volume
        self.kind = kind
        self.status = status
        self.phase = phase
        self.target = target
        self.bytesDone = bytesDone
        self.bytesTotal = bytesTotal
        self.error = error
        self.startedAt = startedAt
        self.updatedAt = updatedAt
        self.pid = pid
        self.cancelRequested = cancelRequested
    }

    /// Whole percent of the bytes to copy.
    public var percent: Int { bytesTotal == 0 ? (status == .success ? 100 : 0) : Int(bytesDone * 100 / bytesTotal) }
}

extension Registry {
    static let migrationsTable = """
        CREATE TABLE migrations (
            volume TEXT PRIMARY KEY REFERENCES volumes(name) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            phase TEXT NOT NULL,
            target TEXT NOT NULL,
            bytes_done INTEGER NOT NULL,
            bytes_total INTEGER NOT NULL,
            error TEXT NOT NULL,
            started_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            pid INTEGER NOT NULL,
            cancel_requested INTEGER NOT NULL
        );
        """

    /// The volume's current or last migration; nil if it never had one.
    public func migration(of volume: String) throws -> MigrationRecord? {
        guard let row = try database.query("""
            SELECT kind, status, phase, target, bytes_done, bytes_total, error, started_at, updated_at, pid, cancel_requested
            FROM migrations WHERE volume = ?
            """, [.text(volume)]).first else { return nil }
        return MigrationRecord(volume: volume, kind: row[0].text ?? "", status: MigrationRecord.Status(rawValue: row[1].text ?? "") ?? .error,
                               phase: row[2].text ?? "", target: row[3].text ?? "", bytesDone: UInt64(row[4].integer ?? 0),
                               bytesTotal: UInt64(row[5].integer ?? 0), error: row[6].text ?? "", startedAt: row[7].integer ?? 0,
                               updatedAt: row[8].integer ?? 0, pid: Int32(row[9].integer ?? 0), cancelRequested: (row[10].integer ?? 0) != 0)
    }

    /// Writes the record, replacing the volume's earlier one. A cancel asked of a running one is kept.
    public func setMigration(_ record: MigrationRecord) throws {
        try database.query("""
            INSERT INTO migrations (volume, kind, status, phase, target, bytes_done, bytes_total, error, started_at, updated_at,
                                    pid, cancel_requested)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (volume) DO UPDATE SET kind = excluded.kind, status = excluded.status, phase = excluded.phase,
                target = excluded.target, bytes_done = excluded.bytes_done, bytes_total = excluded.bytes_total,
                error = excluded.error, started_at = excluded.started_at, updated_at = excluded.updated_at, pid = excluded.pid,
                cancel_requested = CASE WHEN migrations.status IN ('migrating', 'migrating_attachable')
                                        THEN max(migrations.cancel_requested, excluded.cancel_requested)
                                        ELSE excluded.cancel_requested END
            """, [.text(record.volume), .text(record.kind), .text(record.status.rawValue), .text(record.phase),
                  .text(record.target), .integer(Int64(record.bytesDone)), .integer(Int64(record.bytesTotal)),
                  .text(record.error), .integer(record.startedAt), .integer(record.updatedAt), .integer(Int64(record.pid)),
                  .integer(record.cancelRequested ? 1 : 0)])
    }

    /// Asks the running migration of the volume to stop; false when none runs.
    @discardableResult
    public func requestCancel(of volume: String) throws -> Bool {
        try database.transaction {
            guard let record = try migration(of: volume), record.status.isRunning else { return false }
            try database.query("UPDATE migrations SET cancel_requested = 1 WHERE volume = ?", [.text(volume)])
            return true
        }
    }
}
