import Foundation
import Logging
import ReplicaIdentity
@testable import ReplicaServer
import ReplicaStore
import Synchronization
import Testing

@Suite struct ClearDirtyTests {
    final class Replica {
        let directory = "/var/tmp/keel-clear-\(UUID().uuidString.prefix(8))"
        let store: ReplicaStore

        init() throws {
            store = try ReplicaStore.open(directory: directory, size: 16 << 20)
            _ = try store.claim(Owner(epoch: 1, engine: "e"))
            try store.markDirty([ByteRange(offset: 0, length: 1 << 20)], owner: Owner(epoch: 1, engine: "e"))
        }

        deinit { try? FileManager.default.removeItem(atPath: directory) }

        func service(flush: @escaping @Sendable () throws -> Void) -> ReplicaControlService {
            ReplicaControlService(store: store, sessions: EngineSessions(), flushData: flush,
                                  logger: Logger(label: "test"))
        }
    }

    /// Defect: a dirty mark was deleted without the data under it being
    /// durable; after a power cut replicas could differ in a region marked clean.
    @Test func aMarkIsClearedOnlyAfterTheDataIsFlushed() throws {
        let replica = try Replica()
        let marksAtFlush = Mutex<[Int]>([])
        let service = replica.service { [store = replica.store] in
            let marks = try store.dirtyRanges().count
            marksAtFlush.withLock { $0.append(marks) }
        }
        try service.clearDirtyDurably([ByteRange(offset: 0, length: 1 << 20)], owner: Owner(epoch: 1, engine: "e"))
        #expect(marksAtFlush.withLock { $0 } == [1], "flushed once, while the mark was still there")
        #expect(try replica.store.dirtyRanges().isEmpty)
    }

    @Test func aFailedFlushKeepsTheMark() throws {
        struct DiskGone: Error {}
        let replica = try Replica()
        let service = replica.service { throw DiskGone() }
        #expect(throws: (any Error).self) {
            try service.clearDirtyDurably([ByteRange(offset: 0, length: 1 << 20)], owner: Owner(epoch: 1, engine: "e"))
        }
        #expect(try replica.store.dirtyRanges().count == 1)
    }
}
