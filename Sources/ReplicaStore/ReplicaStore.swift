import SQLite
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A replica's data directory: the head layer file and its metadata.
///
/// ```
/// DIR/replica.sqlite     size, epoch, state, layers (SQLite, WAL, synchronous=FULL)
/// DIR/layers/head.img    the writable head layer, a sparse file of the volume's size
/// ```
/// The database appears last, by rename, so a directory that has it holds a
/// complete replica. The epoch only grows and is on disk before `claim` returns.
public final class ReplicaStore: @unchecked Sendable {
    public static let metadataName = "replica.sqlite"
    public static let schemaVersion: Int64 = 1

    public let directory: String
    public let size: UInt64
    public var headPath: String { directory + "/layers/head.img" }

    private let database: Database
    private var mutex = pthread_mutex_t()
    private var currentEpoch: UInt64

    public enum Failure: Error, CustomStringConvertible, Equatable {
        case sizeRequired(String)
        case sizeMismatch(directory: String, stored: UInt64, requested: UInt64)
        case notAReplica(String)
        case badSize(UInt64)

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
    }

    /// Opens the replica in `directory`, creating it when absent and `size` is given.
    public static func open(directory: String, size: UInt64?) throws -> ReplicaStore {
        let metadata = directory + "/" + metadataName
        if access(metadata, F_OK) != 0 {
            guard let size else { throw Failure.sizeRequired(directory) }
            try create(directory: directory, size: size)
        }
        let store = try ReplicaStore(directory: directory)
        if let size, size != store.size {
            throw Failure.sizeMismatch(directory: directory, stored: store.size, requested: size)
        }
        return store
    }

    private init(directory: String) throws {
        self.directory = directory
        do {
            database = try Database(path: directory + "/" + Self.metadataName, create: false)
            let rows = try database.query("SELECT size, epoch FROM replica WHERE id = 1")
            guard let row = rows.first, let size = row[0].integer, let epoch = row[1].integer else {
                throw Failure.notAReplica(directory)
            }
            self.size = UInt64(size)
            currentEpoch = UInt64(epoch)
        } catch is SQLiteError {
            throw Failure.notAReplica(directory)
        }
        pthread_mutex_init(&mutex, nil)
    }

    deinit { pthread_mutex_destroy(&mutex) }

    public var epoch: UInt64 {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return currentEpoch
    }

    /// Takes the replica for `epoch` if it is newer than any seen, durably.
    public func claim(epoch: UInt64) throws -> Claim {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        if epoch < currentEpoch { return .stale(current: currentEpoch) }
        if epoch == currentEpoch { return .current }
        try database.query("UPDATE replica SET epoch = ? WHERE id = 1", [.integer(Int64(epoch))])
        currentEpoch = epoch
        return .claimed
    }

    private static func create(directory: String, size: UInt64) throws {
        guard size > 0, size % 4096 == 0, size <= UInt64(Int64.max) else { throw Failure.badSize(size) }
        try makeDirectory(directory)
        let entries = try listDirectory(directory).filter { $0 != "layers" && !$0.hasPrefix(metadataName) }
        guard entries.isEmpty else { throw Failure.notAReplica(directory) }
        try makeDirectory(directory + "/layers")

        let head = directory + "/layers/head.img"
        let fd = Glibc.open(head, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemError.current("create \(head)") }
        defer { Glibc.close(fd) }
        try retryingOnInterrupt("truncate \(head)") { ftruncate(fd, off_t(size)) }
        try retryingOnInterrupt("fsync \(head)") { fsync(fd) }

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
                        epoch INTEGER NOT NULL,
                        state TEXT NOT NULL,
                        created TEXT NOT NULL DEFAULT (datetime('now')));
                    CREATE TABLE layers (
                        id INTEGER PRIMARY KEY,
                        file TEXT NOT NULL UNIQUE,
                        parent INTEGER REFERENCES layers(id),
                        kind TEXT NOT NULL CHECK (kind IN ('head', 'snapshot')),
                        created TEXT NOT NULL DEFAULT (datetime('now')));
                    """)
                try database.query("INSERT INTO replica (id, schema, size, epoch, state) VALUES (1, ?, ?, 0, 'clean')",
                                   [.integer(schemaVersion), .integer(Int64(size))])
                try database.query("INSERT INTO layers (file, kind) VALUES ('layers/head.img', 'head')")
            }
            // Back to a single file, so that the rename below moves all of it.
            try database.execute("PRAGMA journal_mode=DELETE")
        }
        guard rename(temporary, directory + "/" + metadataName) == 0 else {
            throw SystemError.current("rename \(temporary)")
        }
        try syncDirectory(directory)
    }

    private static func makeDirectory(_ path: String) throws {
        if mkdir(path, 0o700) != 0 && errno != EEXIST { throw SystemError.current("mkdir \(path)") }
    }

    private static func listDirectory(_ path: String) throws -> [String] {
        guard let dir = opendir(path) else { throw SystemError.current("opendir \(path)") }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    private static func syncDirectory(_ path: String) throws {
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.current("open \(path)") }
        defer { Glibc.close(fd) }
        try retryingOnInterrupt("fsync \(path)") { fsync(fd) }
    }
}
