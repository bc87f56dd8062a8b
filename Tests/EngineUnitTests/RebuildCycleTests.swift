@testable import Engine
import Logging
import ReplicaIdentity
import Testing

/// The rebuild's decisions without sockets: regions closed and quiet before
/// each copy, another source after a failed copy, marks on the joining
/// replicas, one of several that fails dropped alone, the region open again
/// however the rebuild ends.
@Suite struct RebuildCycleTests {
    private final class Metadata: ReplicaMetadata {
        var calls: [(MetadataCall, [Int])] = []
        var answer = MetadataAnswer.done
        func run(_ call: MetadataCall, on indexes: [Int]) -> [Int: MetadataAnswer] {
            calls.append((call, indexes))
            return Dictionary(uniqueKeysWithValues: indexes.map { ($0, answer) })
        }
    }

    private let logger = Logger(label: "test") { _ in SwiftLogNoOpLogHandler() }
    private let region: UInt64 = 1 << 20

    /// Two RW replicas (0, 1) and a joining one (2), over `regions` regions.
    private func setUp(regions: UInt64 = 2, maxWaits: Int = 10) throws -> (WriteGate, ReplicaSet, Metadata, RebuildCycle) {
        let gate = WriteGate(size: regions * region - 4096, regionSize: region)
        let replicas = ReplicaSet((0..<2).map {
            ReplicaSet.Replica(address: .unix(path: "r\($0)"), controlAddress: .unix(path: "c\($0)"), id: "r\($0)", mode: .rw)
        }, logger: logger)
        let index = try replicas.add(address: .unix(path: "r2"), controlAddress: .unix(path: "c2"), id: "r2")
        let metadata = Metadata()
        let cycle = RebuildCycle(indexes: [index], gate: gate, replicas: replicas, metadata: metadata, maxWaits: maxWaits,
                                 logger: logger) {}
        return (gate, replicas, metadata, cycle)
    }

    /// A write admitted (its region marked first) and not yet finished.
    private func writeInFlight(_ gate: WriteGate, at offset: UInt64) {
        _ = gate.admit(offset: offset, length: 4096)
        gate.marked(gate.takeRegionsToMark())
        #expect(gate.admit(offset: offset, length: 4096))
    }

    @Test func everyRegionIsCopiedThenTheReplicaIsFlushedAndPromoted() throws {
        let (_, replicas, metadata, cycle) = try setUp()
        #expect(cycle.next() == .copy(region: 0, range: ByteRange(offset: 0, length: region), source: 0, targets: [2]))
        cycle.copied(.success(()))
        #expect(replicas.replicas[2].rebuiltBytes == region)
        // The last region is clipped to the volume.
        #expect(cycle.next() == .copy(region: 1, range: ByteRange(offset: region, length: region - 4096), source: 0, targets: [2]))
        cycle.copied(.success(()))
        #expect(cycle.next() == .flush(targets: [2]))
        cycle.flushed(.success(()))
        #expect(cycle.next() == .finished)
        #expect(replicas.mode(2) == .rw)
        #expect(metadata.calls.isEmpty, "no region was dirty: nothing to mark")
    }

    /// Writes ahead of the copy skip the joining replica (the copy brings
    /// them); a region's writes reach it from the moment the region opens
    /// again after its copy, never later, or one parked there would be lost on it.
    @Test func theJoiningReplicaTakesARegionsWritesFromTheMomentItsCopyOpensIt() throws {
        let gate = WriteGate(size: 2 * region, regionSize: region)
        let replicas = ReplicaSet((0..<2).map {
            ReplicaSet.Replica(address: .unix(path: "r\($0)"), controlAddress: .unix(path: "c\($0)"), id: "r\($0)", mode: .rw)
        }, logger: logger)
        let index = try replicas.add(address: .unix(path: "r2"), controlAddress: .unix(path: "c2"), id: "r2")
        var takenWhenOpened: [Bool] = []
        let cycle = RebuildCycle(indexes: [index], gate: gate, replicas: replicas, metadata: Metadata(), maxWaits: 10,
                                 logger: logger) { takenWhenOpened.append(replicas.takesWrite(index, at: 0)) }
        #expect(replicas.takesWrite(0, at: region) && !replicas.takesWrite(index, at: 0), "RW takes all; nothing copied yet")
        #expect(cycle.next() == .copy(region: 0, range: ByteRange(offset: 0, length: region), source: 0, targets: [2]))
        cycle.copied(.success(()))
        #expect(takenWhenOpened == [true])
        #expect(!replicas.takesWrite(index, at: region), "region 1 is still ahead of the copy")
        #expect(cycle.next() == .copy(region: 1, range: ByteRange(offset: region, length: region), source: 0, targets: [2]))
        cycle.copied(.failure(EngineError("source gone")))
        #expect(!replicas.takesWrite(index, at: region), "a failed copy leaves the region to the next try")
    }

    @Test func aRegionIsCopiedOnlyOnceTheWritesInItHaveFinished() throws {
        let (gate, _, _, cycle) = try setUp()
        writeInFlight(gate, at: 0)
        #expect(cycle.next() == .wait)
        #expect(!gate.admit(offset: 8192, length: 4096), "the region is closed to new writes")
        #expect(cycle.next() == .wait)
        gate.finish(offset: 0, length: 4096)
        guard case .copy(region: 0, _, _, _) = cycle.next() else { Issue.record("no copy once quiet"); return }
        cycle.copied(.success(()))
        #expect(gate.admit(offset: 8192, length: 4096), "open again after the copy")
    }

    @Test func regionsDirtyWhenTheReplicaJoinsAreMarkedOnIt() throws {
        let (gate, _, metadata, cycle) = try setUp()
        writeInFlight(gate, at: region)
        gate.finish(offset: region, length: 4096)
        _ = cycle.next()
        #expect(metadata.calls.count == 1)
        guard case (.markDirty(let spans), let on) = metadata.calls[0] else { Issue.record("not a mark"); return }
        #expect(spans == [ByteRange(offset: region, length: region)] && on == [2])
    }

    @Test func aFailedCopyMovesToAnotherSourceThenFailsTheReplicaWhenNoneIsLeft() throws {
        let (gate, replicas, _, cycle) = try setUp()
        #expect(cycle.next() == .copy(region: 0, range: ByteRange(offset: 0, length: region), source: 0, targets: [2]))
        cycle.copied(.failure(EngineError("source gone")))
        _ = gate.admit(offset: 0, length: 4096)
        gate.marked(gate.takeRegionsToMark())
        #expect(gate.admit(offset: 0, length: 4096), "the region opens between tries")
        gate.finish(offset: 0, length: 4096)
        #expect(cycle.next() == .copy(region: 0, range: ByteRange(offset: 0, length: region), source: 1, targets: [2]))
        cycle.copied(.failure(EngineError("gone too")))
        #expect(cycle.next() == .finished)
        #expect(replicas.mode(2) == .err)
        #expect(replicas.replicas[2].reason.contains("every source failed"))
    }

    @Test func writesThatNeverFinishFailTheRebuildAndOpenTheRegion() throws {
        let (gate, replicas, _, cycle) = try setUp(maxWaits: 3)
        writeInFlight(gate, at: 0)
        for _ in 0..<3 { #expect(cycle.next() == .wait) }
        #expect(cycle.next() == .finished)
        #expect(replicas.mode(2) == .err)
        gate.finish(offset: 0, length: 4096)
        #expect(gate.admit(offset: 4096, length: 4096))
    }

    @Test func aReplicaFailedOrRemovedMeanwhileStopsTheRebuildWithTheRegionOpen() throws {
        let (gate, replicas, _, cycle) = try setUp()
        writeInFlight(gate, at: 0)
        #expect(cycle.next() == .wait)
        replicas.fail(2, reason: "connection lost")
        #expect(cycle.next() == .finished)
        gate.finish(offset: 0, length: 4096)
        #expect(gate.admit(offset: 4096, length: 4096))
        #expect(!replicas.promote(2))
    }

    @Test func aReplicaThatRefusesTheMarksAsNotItsOwnersFencesTheEngine() throws {
        let (gate, replicas, metadata, cycle) = try setUp()
        writeInFlight(gate, at: 0)
        gate.finish(offset: 0, length: 4096)
        metadata.answer = .notOwner
        #expect(cycle.next() == .finished)
        #expect(replicas.isFenced)
    }

    /// Two RW replicas (0, 1) and three joining ones (2, 3, 4) rebuilt in one pass.
    private func setUpThree() throws -> (WriteGate, ReplicaSet, Metadata, RebuildCycle) {
        let gate = WriteGate(size: 2 * region, regionSize: region)
        let replicas = ReplicaSet((0..<2).map {
            ReplicaSet.Replica(address: .unix(path: "r\($0)"), controlAddress: .unix(path: "c\($0)"), id: "r\($0)", mode: .rw)
        }, logger: logger)
        let indexes = try (2..<5).map { try replicas.add(address: .unix(path: "r\($0)"), controlAddress: .unix(path: "c\($0)"), id: "r\($0)") }
        let metadata = Metadata()
        let cycle = RebuildCycle(indexes: indexes, gate: gate, replicas: replicas, metadata: metadata, maxWaits: 10, logger: logger) {}
        return (gate, replicas, metadata, cycle)
    }

    @Test func severalReplicasAreCopiedFromOneReadOfEachRegionAndPromotedTogether() throws {
        let (gate, replicas, metadata, cycle) = try setUpThree()
        writeInFlight(gate, at: region)
        gate.finish(offset: region, length: 4096)
        #expect(cycle.next() == .copy(region: 0, range: ByteRange(offset: 0, length: region), source: 0, targets: [2, 3, 4]))
        #expect(metadata.calls.count == 1 && metadata.calls.first?.1 == [2, 3, 4], "the dirty region is marked on every joining replica")
        cycle.copied(.success(()))
        #expect((2..<5).allSatisfy { replicas.replicas[$0].rebuiltBytes == region && replicas.takesWrite($0, at: 0) })
        #expect(cycle.next() == .copy(region: 1, range: ByteRange(offset: region, length: region), source: 0, targets: [2, 3, 4]))
        cycle.copied(.success(()))
        #expect(cycle.next() == .flush(targets: [2, 3, 4]))
        cycle.flushed(.success(()))
        #expect(cycle.next() == .finished)
        #expect((2..<5).allSatisfy { replicas.mode($0) == .rw })
    }

    @Test func aJoiningReplicaThatFailsACopyIsDroppedAloneAndTheRegionCopiedAgainToTheOthers() throws {
        let (gate, replicas, _, cycle) = try setUpThree()
        #expect(cycle.next() == .copy(region: 0, range: ByteRange(offset: 0, length: region), source: 0, targets: [2, 3, 4]))
        cycle.copied(.failure(RebuildCycle.TargetFailed(index: 3, reason: "connection reset")))
        #expect(replicas.mode(3) == .err && replicas.replicas[3].reason.contains("connection reset"))
        writeInFlight(gate, at: 0)
        gate.finish(offset: 0, length: 4096)
        #expect(cycle.next() == .copy(region: 0, range: ByteRange(offset: 0, length: region), source: 0, targets: [2, 4]),
                "the same source, the region again (it opened between tries)")
        #expect(!replicas.takesWrite(2, at: 0), "nothing counts as copied before the copy succeeds")
        cycle.copied(.success(()))
        _ = cycle.next()
        cycle.copied(.success(()))
        #expect(cycle.next() == .flush(targets: [2, 4]))
        cycle.flushed(.failure(RebuildCycle.TargetFailed(index: 4, reason: "flush failed")))
        #expect(cycle.next() == .flush(targets: [2]), "the others are flushed again")
        cycle.flushed(.success(()))
        #expect(cycle.next() == .finished)
        #expect(replicas.mode(2) == .rw && replicas.mode(3) == .err && replicas.mode(4) == .err)
    }

    @Test func aJoiningReplicaRemovedMeanwhileLeavesTheOthersCopying() throws {
        let (_, replicas, _, cycle) = try setUpThree()
        _ = try replicas.remove(address: .unix(path: "r3"))
        #expect(cycle.next() == .copy(region: 0, range: ByteRange(offset: 0, length: region), source: 0, targets: [2, 4]))
        cycle.copied(.success(()))
        _ = try replicas.remove(address: .unix(path: "r2"))
        _ = try replicas.remove(address: .unix(path: "r4"))
        #expect(cycle.next() == .finished, "no joining replica left")
    }

    @Test func whenEverySourceFailsEveryJoiningReplicaFails() throws {
        let (_, replicas, _, cycle) = try setUpThree()
        for source in 0..<2 {
            #expect(cycle.next() == .copy(region: 0, range: ByteRange(offset: 0, length: region), source: source, targets: [2, 3, 4]))
            cycle.copied(.failure(EngineError("source \(source) gone")))
        }
        #expect(cycle.next() == .finished)
        #expect((2..<5).allSatisfy { replicas.mode($0) == .err })
    }
}
