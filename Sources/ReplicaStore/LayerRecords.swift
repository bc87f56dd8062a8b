import LayerStack
import ReplicaIdentity
import SQLite
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A layer of the chain, with its files.
public struct LayerRecord: Equatable, Sendable {
    public init(id: LayerID, files: LayerFiles) {
        self.id = id
        self.files = files
    }

    public let id: LayerID
    public let files: LayerFiles
}

/// A frozen layer that carries a snapshot's name.
public struct SnapshotRecord: Equatable, Sendable {
    public let name: String
    public let layer: LayerID
    /// When it was frozen, seconds since 1970 (UTC).
    public let created: Int64
    /// The snapshot below it, nil for the oldest.
    public let parent: String?
    /// Its data is known to be on disk: synced before the freeze was recorded.
    /// A freeze found switched at open, never recorded, is unsealed (a crash
    /// may have taken some of its data), and the next engine start removes it.
    public let sealed: Bool

    public init(name: String, layer: LayerID, created: Int64, parent: String?, sealed: Bool = true) {
        self.sealed = sealed
        self.name = name
        self.layer = layer
        self.created = created
        self.parent = parent
    }
}

extension ReplicaStore {
    /// Where layers' files live.
    public var layersDirectory: String { directory + "/layers" }

    /// The chain, oldest layer first, the head last.
    public func chain() throws -> [LayerRecord] {
        try locked { try chainRows().map(\.record) }
    }

    /// The snapshots, oldest first.
    public func snapshots() throws -> [SnapshotRecord] {
        try locked {
            var parent: String?
            var snapshots: [SnapshotRecord] = []
            for row in try chainRows() {
                guard let name = row.name else { continue }
                snapshots.append(SnapshotRecord(name: name, layer: row.record.id, created: row.frozen ?? 0, parent: parent,
                                                sealed: !row.unsealed))
                parent = name
            }
            return snapshots
        }
    }

    public enum SnapshotFailure: Error, CustomStringConvertible, Equatable {
        case nameTaken(String)
        case badName(String)
        case unknown(String)
        case beingRead(String, connections: Int)
        case newerSnapshots(String, [String])

        public var description: String {
            switch self {
            case .nameTaken(let name):
                return "a snapshot named '\(name)' exists already; pick another name"
            case .badName(let name):
                return "'\(name)' is not a snapshot name: use \(SnapshotName.rule)"
            case .unknown(let name):
                return "there is no snapshot named '\(name)'; see keel snapshot ls"
            case .newerSnapshots(let name, let newer):
                return "snapshots newer than \(name) exist (\(newer.joined(separator: ", "))); remove them first, or revert with --discard-newer"
            case .beingRead(let name, let connections):
                return "snapshot \(name) is being read by \(connections) connection(s) (an export or a backup); remove it once they are done"
            }
        }
    }

    /// Refuses anyone but `owner` (nil: no check).
    public func checkOwner(_ owner: Owner?) throws {
        try locked { try check(owner) }
    }

    /// Refuses a bad or taken name, or another owner, before anything is made.
    public func checkNewSnapshot(_ name: String, owner: Owner?) throws {
        guard SnapshotName.isValid(name) else { throw SnapshotFailure.badName(name) }
        try locked {
            try check(owner)
            guard try database.query("SELECT 1 FROM layers WHERE name = ?", [.text(name)]).isEmpty else {
                throw SnapshotFailure.nameTaken(name)
            }
        }
    }

    /// A future head's files, created empty and synced, under the id after every layer's.
    public func makeHeadFiles() throws -> LayerRecord {
        try locked {
            let highest = try database.query("SELECT max(id) FROM layers").first?[0].integer ?? 0
            let pending = try database.query("SELECT layer FROM pending_freeze").first?[0].integer ?? 0
            let id = LayerID(max(highest, pending)) + 1
            let files = LayerFiles(directory: layersDirectory, id: id)
            try? files.remove()  // a crash's leftovers under this id; nothing lists them
            _ = try LayerFiles.create(dataPath: files.dataPath, mapPath: files.mapPath, size: size)
            try files.prefillMapLog()
            return LayerRecord(id: id, files: files)
        }
    }

    // MARK: - A freeze in two steps

    /// A freeze recorded before the data path is held: its new head and the
    /// snapshot's name. Whether it happened is said by the new head's map log
    /// (`LayerFiles.startsWithARecord`), written in the switch.
    public struct PendingFreeze: Equatable, Sendable {
        public let name: String
        public let newHead: LayerRecord
        public let time: Int64

        public init(name: String, newHead: LayerRecord, time: Int64) {
            self.name = name
            self.newHead = newHead
            self.time = time
        }
    }

    /// Records `pending` durably, replacing an earlier one never switched to
    /// (whose files go, unless they are these).
    public func recordPendingFreeze(_ pending: PendingFreeze, owner: Owner?) throws {
        let replaced: PendingFreeze? = try locked {
            try check(owner)
            let earlier = try readPendingFreeze()
            try database.transaction {
                _ = try database.query("""
                    INSERT OR REPLACE INTO pending_freeze (id, layer, file, map, name, time) VALUES (1, ?, ?, ?, ?, ?)
                    """, [.integer(Int64(pending.newHead.id)), .text(relative(pending.newHead.files.dataPath)),
                          .text(relative(pending.newHead.files.mapPath)), .text(pending.name), .integer(pending.time)])
            }
            return earlier
        }
        if let replaced, replaced.newHead != pending.newHead { try replaced.newHead.files.remove() }
    }

    public func pendingFreeze() throws -> PendingFreeze? {
        try locked { try readPendingFreeze() }
    }

    /// The switch happened: the record says so too (no owner check: the chain
    /// in memory has switched whoever owns the replica now). `sealed`: the
    /// frozen layer's data was synced first.
    public func commitPendingFreeze(sealed: Bool) throws {
        try locked {
            guard let pending = try readPendingFreeze() else { return }
            try database.transaction {
                try promote(name: pending.name, newHead: pending.newHead, at: pending.time, sealed: sealed)
                try database.query("DELETE FROM pending_freeze")
            }
        }
    }

    /// At open: a pending freeze whose switch happened is committed, unsealed
    /// (a power cut may have taken some of the frozen data), one whose switch never came is dropped.
    func settlePendingFreeze() throws {
        guard let pending = try pendingFreeze() else { return }
        if try pending.newHead.files.startsWithARecord() {
            try commitPendingFreeze(sealed: false)
        } else {
            try locked { _ = try database.query("DELETE FROM pending_freeze") }
            try pending.newHead.files.remove()
        }
    }

    private func readPendingFreeze() throws -> PendingFreeze? {
        guard let row = try database.query("SELECT layer, file, map, name, time FROM pending_freeze WHERE id = 1").first,
              let layer = row[0].integer, let file = row[1].text, let map = row[2].text, let name = row[3].text,
              let time = row[4].integer else { return nil }
        let files = LayerFiles(dataPath: directory + "/" + file, mapPath: directory + "/" + map)
        return PendingFreeze(name: name, newHead: LayerRecord(id: LayerID(layer), files: files), time: time)
    }

    /// Inside a transaction: the head is frozen as `name`, `newHead` becomes the head on it.
    private func promote(name: String, newHead: LayerRecord, at time: Int64, sealed: Bool) throws {
        guard let head = try database.query("SELECT id FROM layers WHERE kind = 'head'").first?[0].integer else {
            throw Failure.notAReplica(directory)
        }
        try database.query("UPDATE layers SET kind = 'snapshot', name = ?, frozen = ?, unsealed = ? WHERE id = ?",
                           [.text(name), .integer(time), .integer(sealed ? 0 : 1), .integer(head)])
        // A name used again is that new snapshot's, not a removed one's.
        try database.query("DELETE FROM removed_snapshots WHERE name = ?", [.text(name)])
        try database.query("INSERT INTO layers (id, file, map, parent, kind) VALUES (?, ?, ?, ?, 'head')",
                           [.integer(Int64(newHead.id)), .text(relative(newHead.files.dataPath)),
                            .text(relative(newHead.files.mapPath)), .integer(head)])
    }

    // MARK: - Removing a snapshot

    /// The snapshot's layer leaves the chain (its child's parent becomes its
    /// parent) and its name is kept as removed, in one transaction. Its
    /// files stay until the caller removes them (or the next open does).
    public func dropSnapshotLayer(_ snapshot: SnapshotRecord, owner: Owner?) throws {
        try locked {
            try check(owner)
            let id = Int64(snapshot.layer)
            guard let row = try database.query("SELECT parent FROM layers WHERE id = ? AND kind = 'snapshot' AND name = ?",
                                               [.integer(id), .text(snapshot.name)]).first else {
                throw SnapshotFailure.unknown(snapshot.name)
            }
            try database.transaction {
                try database.query("UPDATE layers SET parent = ? WHERE parent = ?", [row[0], .integer(id)])
                try database.query("DELETE FROM layers WHERE id = ?", [.integer(id)])
                try database.query("INSERT OR REPLACE INTO removed_snapshots (name, time) VALUES (?, ?)",
                                   [.text(snapshot.name), .integer(Int64(time(nil)))])
            }
        }
    }

    // MARK: - Reverting

    /// The head and every layer newer than `snapshot` leave the chain, the
    /// snapshots among them kept as removed; `newHead` (from `makeHeadFiles`)
    /// starts empty on `snapshot`; the whole volume is marked dirty. One
    /// transaction: an engine that stops before every replica reverted finds
    /// them dirty and resyncs them all. Returns the layers discarded, whose
    /// files the caller removes.
    public func revert(to snapshot: SnapshotRecord, newHead: LayerRecord, owner: Owner?) throws -> [LayerRecord] {
        try locked {
            try check(owner)
            let rows = try chainRows()
            guard let k = rows.firstIndex(where: { $0.record.id == snapshot.layer && $0.name == snapshot.name }) else {
                throw SnapshotFailure.unknown(snapshot.name)
            }
            let discarded = rows[(k + 1)...]
            try database.transaction {
                // Newest first: each row is the parent of the one after it.
                for row in discarded.reversed() {
                    try database.query("DELETE FROM layers WHERE id = ?", [.integer(Int64(row.record.id))])
                    if let name = row.name {
                        try database.query("INSERT OR REPLACE INTO removed_snapshots (name, time) VALUES (?, ?)",
                                           [.text(name), .integer(Int64(time(nil)))])
                    }
                }
                try database.query("INSERT INTO layers (id, file, map, parent, kind) VALUES (?, ?, ?, ?, 'head')",
                                   [.integer(Int64(newHead.id)), .text(relative(newHead.files.dataPath)),
                                    .text(relative(newHead.files.mapPath)), .integer(Int64(snapshot.layer))])
                try database.query("INSERT OR REPLACE INTO dirty (offset, length) VALUES (0, ?)", [.integer(Int64(size))])
            }
            return discarded.map(\.record)
        }
    }

    /// The names of snapshots removed here, oldest removal first.
    public func removedSnapshots() throws -> [String] {
        try locked {
            try database.query("SELECT name FROM removed_snapshots ORDER BY time, name").compactMap { $0[0].text }
        }
    }

    /// A crash between creating a layer's files and the transaction that
    /// lists it leaves files no layer names: they go at open.
    func removeUnlistedLayerFiles() throws {
        let listed = try locked {
            Set(try database.query("SELECT file, map FROM layers UNION ALL SELECT file, map FROM pending_freeze").flatMap { row in
                [row[0].text, row[1].text].compactMap { $0 }
            })
        }
        for name in try Self.listDirectory(layersDirectory) where !listed.contains("layers/" + name) {
            guard name.hasSuffix(".img") || name.hasSuffix(".map") else { continue }
            if unlink(layersDirectory + "/" + name) != 0 && errno != ENOENT {
                throw SystemError.current("unlink \(layersDirectory)/\(name)")
            }
        }
        try Self.syncDirectory(layersDirectory)
    }

    private func relative(_ path: String) -> String {
        String(path.dropFirst(directory.count + 1))
    }

    private struct ChainRow {
        var record: LayerRecord
        var name: String?
        var frozen: Int64?
        var unsealed: Bool
    }

    /// From the head down its parents, returned oldest first.
    private func chainRows() throws -> [ChainRow] {
        let rows = try database.query("SELECT id, file, map, parent, kind, name, frozen, unsealed FROM layers")
        var byID: [Int64: (row: ChainRow, parent: Int64?)] = [:]
        var head: Int64?
        for row in rows {
            guard let id = row[0].integer, let file = row[1].text, let map = row[2].text else { continue }
            let files = LayerFiles(dataPath: directory + "/" + file, mapPath: directory + "/" + map)
            byID[id] = (ChainRow(record: LayerRecord(id: LayerID(id), files: files), name: row[5].text, frozen: row[6].integer,
                                 unsealed: row[7].integer == 1),
                        row[3].integer)
            if row[4].text == "head" { head = id }
        }
        var chain: [ChainRow] = []
        var next = head
        while let id = next, let layer = byID[id], chain.count <= byID.count {
            chain.append(layer.row)
            next = layer.parent
        }
        guard !chain.isEmpty else { throw Failure.notAReplica(directory) }
        return chain.reversed()
    }
}
