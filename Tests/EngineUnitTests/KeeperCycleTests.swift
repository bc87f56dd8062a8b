@testable import Engine
import Logging
import Testing

@Suite struct KeeperCycleTests {
    private final class Metadata: ReplicaMetadata {
        var calls: [(MetadataCall, [Int])] = []
        func run(_ call: MetadataCall, on indexes: [Int]) -> [Int: MetadataAnswer] {
            calls.append((call, indexes))
            return Dictionary(uniqueKeysWithValues: indexes.map { ($0, .done) })
        }
    }

    /// Found by the simulator: with the last RW replica failed while another
    /// was being rebuilt, the keeper recorded a membership with no member on
    /// the WO replica; that record, being the newest, left the volume unable to start.
    @Test func aMembershipWithNoMemberIsNeverRecorded() throws {
        let logger = Logger(label: "test") { _ in SwiftLogNoOpLogHandler() }
        let replicas = ReplicaSet([ReplicaSet.Replica(address: .unix(path: "r0"), controlAddress: .unix(path: "c0"),
                                                      id: "r0", mode: .rw)], logger: logger)
        _ = try replicas.add(address: .unix(path: "r1"), controlAddress: .unix(path: "c1"), id: "r1")
        let metadata = Metadata()
        let keeper = KeeperCycle(gate: WriteGate(size: 1 << 20), replicas: replicas, metadata: metadata, epoch: 1,
                                 logger: logger) {}
        replicas.fail(0, reason: "connection lost")
        keeper.persistMembership()
        #expect(metadata.calls.isEmpty)
        #expect(!replicas.holdsAcknowledgements, "nothing waits for a record that will not be made")
        #expect(!replicas.hasHealthyReplica)
    }
}
