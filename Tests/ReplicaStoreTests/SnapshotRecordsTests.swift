import Foundation
import LayerStack
import ReplicaIdentity
import ReplicaStore
import SQLite
import Testing

/// The replica's records of its chain: freezing the head, names, and what a
/// crash between creating a layer's files and recording it leaves.
@Suite struct SnapshotRecordsTests {
    private func emptyDirectory() throws -> String {
        let path = "/var/tmp/keel-snaprec-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    private let owner = Owner(epoch: 3, engine: "e")

    /// Both steps of a freeze as a replica takes them: the pending record, then its commit.
    @discardableResult
    private func freeze(_ store: ReplicaStore, _ name: String, owner: Owner?, at time: Int64) throws -> LayerRecord {
        try store.checkNewSnapshot(name, owner: owner)
        let head = try store.makeHeadFiles()
        try store.recordPendingFreeze(.init(name: name, newHead: head, time: time), owner: owner)
        try store.commitPendingFreeze(sealed: true)
        return head
    }

    @Test func aFrozenHeadBecomesANamedSnapshotUnderANewHead() throws {
        let dir = try emptyDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try ReplicaStore.open(directory: dir, size: 4 << 20)
        #expect(try store.claim(owner) == .claimed)
        let bottom = try store.chain()[0]
        let head = try freeze(store, "s1", owner: owner, at: 1_700_000_000)
        let second = try freeze(store, "s2", owner: owner, at: 1_700_000_100)

        let reopened = try ReplicaStore.open(directory: dir, size: nil)
        #expect(try reopened.chain() == [bottom, head, second])
        #expect(try reopened.snapshots() == [
            SnapshotRecord(name: "s1", layer: bottom.id, created: 1_700_000_000, parent: nil),
            SnapshotRecord(name: "s2", layer: head.id, created: 1_700_000_100, parent: "s1"),
        ])
    }

    @Test func takenAndBadNamesAndOtherOwnersAreRefusedBeforeAnyFileIsMade() throws {
        let dir = try emptyDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try ReplicaStore.open(directory: dir, size: 4 << 20)
        _ = try store.claim(owner)
        try freeze(store, "s1", owner: owner, at: 0)
        let files = try FileManager.default.contentsOfDirectory(atPath: dir + "/layers").sorted()
        #expect(throws: ReplicaStore.SnapshotFailure.nameTaken("s1")) { try store.checkNewSnapshot("s1", owner: owner) }
        #expect(throws: ReplicaStore.SnapshotFailure.badName("a/b")) { try store.checkNewSnapshot("a/b", owner: owner) }
        #expect(throws: ReplicaStore.Failure.self) { try store.checkNewSnapshot("s2", owner: Owner(epoch: 2, engine: "old")) }
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/layers").sorted() == files)
    }

    /// A crash after a layer's files were made and before the transaction
    /// that records it: the files go at the next open, the chain is as before.
    @Test func filesOfAnUnrecordedLayerGoAtOpen() throws {
        let dir = try emptyDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try ReplicaStore.open(directory: dir, size: 4 << 20)
        let chain = try store.chain()
        let orphan = try store.makeHeadFiles()
        #expect(FileManager.default.fileExists(atPath: orphan.files.dataPath))
        let reopened = try ReplicaStore.open(directory: dir, size: nil)
        #expect(try reopened.chain() == chain)
        #expect(!FileManager.default.fileExists(atPath: orphan.files.dataPath))
        #expect(!FileManager.default.fileExists(atPath: orphan.files.mapPath))
        #expect(try reopened.snapshots().isEmpty)
    }

    /// Schema 6 (no seal recorded) opens at today's schema, its snapshots sealed.
    @Test func aReplicaOfSchemaSixKeepsItsSnapshotsSealed() throws {
        let dir = try emptyDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try freeze(try ReplicaStore.open(directory: dir, size: 4 << 20), "s1", owner: nil, at: 5)
        let database = try Database(path: dir + "/" + ReplicaStore.metadataName, create: false)
        try database.execute("ALTER TABLE layers DROP COLUMN unsealed; UPDATE replica SET schema = 6 WHERE id = 1")
        let store = try ReplicaStore.open(directory: dir, size: nil)
        #expect(try database.query("SELECT schema FROM replica").first?[0].integer == ReplicaStore.schemaVersion)
        #expect(try store.snapshots().map(\.sealed) == [true])
        try freeze(store, "s2", owner: nil, at: 6)
        #expect(try store.snapshots().map(\.name) == ["s1", "s2"])
    }

    /// Schema 4 (layers with map logs, no snapshot names) opens at today's schema and takes snapshots.
    @Test func aReplicaOfSchemaFourTakesSnapshots() throws {
        let dir = try emptyDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try ReplicaStore.open(directory: dir, size: 4 << 20)
        let database = try Database(path: dir + "/" + ReplicaStore.metadataName, create: false)
        try database.execute("""
            ALTER TABLE layers RENAME TO old_layers;
            CREATE TABLE layers (id INTEGER PRIMARY KEY, file TEXT NOT NULL UNIQUE, map TEXT,
                parent INTEGER REFERENCES layers(id), kind TEXT NOT NULL CHECK (kind IN ('head', 'snapshot')),
                created TEXT NOT NULL DEFAULT (datetime('now')));
            INSERT INTO layers SELECT id, file, map, parent, kind, created FROM old_layers;
            DROP TABLE old_layers;
            UPDATE replica SET schema = 4 WHERE id = 1;
            """)
        let store = try ReplicaStore.open(directory: dir, size: nil)
        #expect(try database.query("SELECT schema FROM replica").first?[0].integer == ReplicaStore.schemaVersion)
        try freeze(store, "s1", owner: nil, at: 5)
        #expect(try store.snapshots().map(\.name) == ["s1"])
        #expect(try store.chain().count == 2)
    }

    /// A freeze recorded as pending, then a crash: it happened if the new
    /// head's map log starts with a record (the switch marker), and is then
    /// committed at open, unsealed (its data may not all be on disk); if
    /// not, it is dropped with its files.
    @Test(arguments: [true, false])
    func aPendingFreezeIsSettledAtOpenByItsSwitchMarker(switched: Bool) throws {
        let dir = try emptyDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try ReplicaStore.open(directory: dir, size: 4 << 20)
        let bottom = try store.chain()[0]
        let newHead = try store.makeHeadFiles()
        try store.recordPendingFreeze(.init(name: "s1", newHead: newHead, time: 42), owner: nil)
        if switched {
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: newHead.files.mapPath))
            var marker = [UInt8](repeating: 0, count: MapRecord.size)
            marker.withUnsafeMutableBytes { LayerFiles.switchMarker.encode(into: $0) }
            try handle.write(contentsOf: marker)
            try handle.close()
        }
        let reopened = try ReplicaStore.open(directory: dir, size: nil)
        #expect(try reopened.pendingFreeze() == nil)
        if switched {
            #expect(try reopened.chain() == [bottom, newHead])
            #expect(try reopened.snapshots() == [SnapshotRecord(name: "s1", layer: bottom.id, created: 42, parent: nil, sealed: false)])
        } else {
            #expect(try reopened.chain() == [bottom])
            #expect(!FileManager.default.fileExists(atPath: newHead.files.dataPath))
        }
    }

    /// Removing a snapshot relinks the chain and keeps the name as removed,
    /// until a new snapshot takes the name again.
    @Test func aDroppedLayerLeavesTheChainAndItsNameIsKept() throws {
        let dir = try emptyDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try ReplicaStore.open(directory: dir, size: 4 << 20)
        #expect(try store.claim(owner) == .claimed)
        try freeze(store, "s1", owner: owner, at: 1)
        try freeze(store, "s2", owner: owner, at: 2)
        let chain = try store.chain()
        let s1 = try store.snapshots()[0]
        #expect(throws: ReplicaStore.Failure.self) { try store.dropSnapshotLayer(s1, owner: Owner(epoch: 3, engine: "other")) }
        try store.dropSnapshotLayer(s1, owner: owner)
        let reopened = try ReplicaStore.open(directory: dir, size: nil)
        #expect(try reopened.chain() == [chain[1], chain[2]])
        #expect(try reopened.snapshots().map(\.name) == ["s2"])
        #expect(try reopened.snapshots()[0].parent == nil)
        #expect(try reopened.removedSnapshots() == ["s1"])
        #expect(throws: ReplicaStore.SnapshotFailure.unknown("s1")) { try reopened.dropSnapshotLayer(s1, owner: owner) }
        try freeze(reopened, "s1", owner: owner, at: 3)
        #expect(try reopened.removedSnapshots() == [])
    }
}
