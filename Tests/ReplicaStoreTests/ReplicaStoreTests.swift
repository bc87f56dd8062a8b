import Foundation
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
        let dir = try emptyDirectory() + "/nested"
        defer { remove(dir) }
        #expect(try ReplicaStore.open(directory: dir, size: 1 << 20).size == 1 << 20)
    }

    @Test func epochsOnlyGrowAndSurviveReopening() throws {
        let dir = try emptyDirectory()
        defer { remove(dir) }
        let store = try ReplicaStore.open(directory: dir, size: 1 << 20)
        #expect(try store.claim(epoch: 5) == .claimed)
        #expect(try store.claim(epoch: 5) == .current)
        #expect(try store.claim(epoch: 3) == .stale(current: 5))
        #expect(try store.claim(epoch: 9) == .claimed)
        let reopened = try ReplicaStore.open(directory: dir, size: nil)
        #expect(reopened.epoch == 9)
        #expect(try reopened.claim(epoch: 8) == .stale(current: 9))
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
