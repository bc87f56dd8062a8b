import Foundation
import ReplicaIdentity
import ReplicaStore
import Testing

@Suite struct ReplicaStoreTests {
    private func emptyDirectory() throws -> String {
        let path = "/var/tmp/keel-store-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    private func remove(_ path: String) { try? FileManager.default.removeItem(atPath: path) }

    @Test func createsASparseHeadAndReopensIt() throws {
        let dir = try emptyDirectory()
        defer { remove(dir) }
        let store = try ReplicaStore.open(directory: dir, size: 64 << 20)
        #expect(store.size == 64 << 20 && store.epoch == 0)
        let attributes = try FileManager.default.attributesOfItem(atPath: store.headPath)
        #expect(attributes[.size] as? UInt64 == 64 << 20)
        let reopened = try ReplicaStore.open(directory: dir, size: nil)
        #expect(reopened.size == 64 << 20)
        #expect(try ReplicaStore.open(directory: dir, size: 64 << 20).size == 64 << 20)
    }

    @Test func createsTheDirectoryWhenMissing() throws {
        let parent = try emptyDirectory()
        defer { remove(parent) }
        let dir = parent + "/nested"
        #expect(try ReplicaStore.open(directory: dir, size: 1 << 20).size == 1 << 20)
    }

    @Test func epochsOnlyGrowAndSurviveReopening() throws {
        let dir = try emptyDirectory()
        defer { remove(dir) }
        let store = try ReplicaStore.open(directory: dir, size: 1 << 20)
        #expect(try store.claim(Owner(epoch: 5, engine: "")) == .claimed)
        #expect(try store.claim(Owner(epoch: 5, engine: "")) == .current)
        #expect(try store.claim(Owner(epoch: 3, engine: "")) == .stale(current: 5))
        #expect(try store.claim(Owner(epoch: 9, engine: "")) == .claimed)
        let reopened = try ReplicaStore.open(directory: dir, size: nil)
        #expect(reopened.epoch == 9)
        #expect(try reopened.claim(Owner(epoch: 8, engine: "")) == .stale(current: 9))
    }

    @Test func refusesWhatIsNotAReplica() throws {
        let dir = try emptyDirectory()
        defer { remove(dir) }
        #expect(throws: ReplicaStore.Failure.sizeRequired(dir)) { try ReplicaStore.open(directory: dir, size: nil) }
        FileManager.default.createFile(atPath: dir + "/photo.jpg", contents: Data([1, 2, 3]))
        #expect(throws: ReplicaStore.Failure.notAReplica(dir)) { try ReplicaStore.open(directory: dir, size: 1 << 20) }
        FileManager.default.createFile(atPath: dir + "/replica.sqlite", contents: Data("not a database".utf8))
        #expect(throws: ReplicaStore.Failure.notAReplica(dir)) { try ReplicaStore.open(directory: dir, size: nil) }
    }

    @Test func refusesAnotherSizeOrABadOne() throws {
        let dir = try emptyDirectory()
        defer { remove(dir) }
        _ = try ReplicaStore.open(directory: dir, size: 1 << 20)
        #expect(throws: ReplicaStore.Failure.sizeMismatch(directory: dir, stored: 1 << 20, requested: 2 << 20)) {
            try ReplicaStore.open(directory: dir, size: 2 << 20)
        }
        let other = try emptyDirectory()
        defer { remove(other) }
        #expect(throws: ReplicaStore.Failure.badSize(1000)) { try ReplicaStore.open(directory: other, size: 1000) }
        #expect(throws: ReplicaStore.Failure.badSize(0)) { try ReplicaStore.open(directory: other, size: 0) }
    }
}

@Suite struct ReplicaRecordsTests {
    private func store() throws -> (ReplicaStore, String) {
        let dir = "/var/tmp/keel-store-\(UUID().uuidString.prefix(8))"
        return (try ReplicaStore.open(directory: dir, size: 16 << 20), dir)
    }

    @Test func anIdentityIsChosenOnceAndKept() throws {
        let (first, dir) = try store()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(first.id.count == 32)
        #expect(try ReplicaStore.open(directory: dir, size: nil).id == first.id)
        let (other, otherDir) = try store()
        defer { try? FileManager.default.removeItem(atPath: otherDir) }
        #expect(other.id != first.id)
    }

    @Test func anEpochBelongsToTheEngineThatClaimedItFirst() throws {
        let (store, dir) = try store()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(try store.claim(Owner(epoch: 3, engine: "a")) == .claimed)
        #expect(try store.claim(Owner(epoch: 3, engine: "a")) == .current)
        #expect(try store.claim(Owner(epoch: 3, engine: "b")) == .taken(engine: "a"))
        #expect(store.owner == Owner(epoch: 3, engine: "a") && store.owner != Owner(epoch: 3, engine: "b"))
        #expect(try store.claim(Owner(epoch: 4, engine: "b")) == .claimed)
        let reopened = try ReplicaStore.open(directory: dir, size: nil)
        #expect(reopened.owner == Owner(epoch: 4, engine: "b"))
    }

    @Test func dirtyRangesPersistAndClearByRange() throws {
        let (store, dir) = try store()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let mib: UInt64 = 1 << 20
        try store.markDirty([0, 1, 5, 9].map { ByteRange(offset: $0 * mib, length: mib) })
        try store.markDirty([ByteRange(offset: mib, length: mib)])
        #expect(try store.dirtyRanges().map(\.offset) == [0, mib, 5 * mib, 9 * mib])
        try store.clearDirty([ByteRange(offset: 0, length: 6 * mib)])
        #expect(try ReplicaStore.open(directory: dir, size: nil).dirtyRanges() == [ByteRange(offset: 9 * mib, length: mib)])
    }

    @Test func theMembershipRecordIsReplacedWhole() throws {
        let (store, dir) = try store()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(try store.membership() == nil)
        try store.setMembership(Membership(epoch: 2, generation: 1, members: ["a", "b"]))
        try store.setMembership(Membership(epoch: 2, generation: 2, members: ["a"]))
        let record = try ReplicaStore.open(directory: dir, size: nil).membership()
        #expect(record == Membership(epoch: 2, generation: 2, members: ["a"]))
        #expect(record!.isNewer(than: Membership(epoch: 1, generation: 9, members: [])))
        #expect(!record!.isNewer(than: Membership(epoch: 2, generation: 3, members: [])))
    }
}

@Suite struct ReplicaOwnershipTests {
    /// Changes name their owner and are checked under the claim's lock: a fenced engine changes nothing.
    @Test func onlyTheOwnerChangesRecords() throws {
        let dir = "/var/tmp/keel-store-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try ReplicaStore.open(directory: dir, size: 16 << 20)
        #expect(try store.claim(Owner(epoch: 2, engine: "old")) == .claimed)
        try store.markDirty([ByteRange(offset: 0, length: 4096)], owner: Owner(epoch: 2, engine: "old"))
        #expect(try store.claim(Owner(epoch: 3, engine: "new")) == .claimed)
        #expect(throws: ReplicaStore.Failure.self) {
            try store.clearDirty([ByteRange(offset: 0, length: 4096)], owner: Owner(epoch: 2, engine: "old"))
        }
        #expect(throws: ReplicaStore.Failure.self) {
            try store.setMembership(Membership(epoch: 2, generation: 9, members: ["x"]), owner: Owner(epoch: 2, engine: "old"))
        }
        #expect(try store.dirtyRanges().count == 1 && store.membership() == nil)
        try store.setMembership(Membership(epoch: 3, generation: 2, members: ["a"]), owner: Owner(epoch: 3, engine: "new"))
        // An older record never replaces a newer one, even from the owner.
        #expect(throws: ReplicaStore.Failure.staleMembership) {
            try store.setMembership(Membership(epoch: 3, generation: 1, members: ["a", "b"]), owner: Owner(epoch: 3, engine: "new"))
        }
        try store.setMembership(Membership(epoch: 3, generation: 2, members: ["a"]), owner: Owner(epoch: 3, engine: "new"))
    }
}
