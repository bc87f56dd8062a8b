import ControlAPI
@testable import Engine
import Testing

@Suite struct VolumeStartupTests {
    private func record(_ epoch: UInt64, _ generation: UInt64, _ members: [String]) -> Keel_Control_V1_Membership {
        .with { $0.epoch = epoch; $0.generation = generation; $0.members = members }
    }

    @Test func aNewVolumeTrustsEveryReachableReplica() throws {
        #expect(try VolumeStartup.members([("a", nil), nil, ("c", nil)]) == [0, 2])
    }

    @Test func theNewestRecordDecides() throws {
        let old = record(1, 1, ["a", "b", "c"]), new = record(1, 2, ["a", "b"])
        #expect(try VolumeStartup.members([("a", new), ("b", new), ("c", old)]) == [0, 1])
        let newer = record(2, 1, ["b", "c"])
        #expect(try VolumeStartup.members([("a", new), ("b", newer), ("c", newer)]) == [1, 2])
    }

    @Test func aReplicaWithoutARecordJoinsOnlyThroughRebuild() throws {
        let current = record(3, 1, ["a", "b"])
        #expect(try VolumeStartup.members([("a", current), ("b", current), ("fresh", nil)]) == [0, 1])
    }

    @Test func aMinorityOfTheNewestMembersIsRefused() throws {
        let old = record(1, 1, ["a", "b", "c"])
        // c missed writes while a and b went on; with a and b unreachable, c must not serve.
        #expect(throws: EngineError.self) { try VolumeStartup.members([nil, nil, ("c", old)]) }
        let pair = record(1, 2, ["a", "b"])
        #expect(throws: EngineError.self) { try VolumeStartup.members([("a", pair), nil]) }
        let alone = record(1, 3, ["a"])
        #expect(try VolumeStartup.members([("a", alone), ("b", pair)]) == [0])
    }

    @Test func dirtyRangesAreMergedAndClipped() {
        let pairs: [(UInt64, UInt64)] = [(4, 2), (0, 2), (2, 2), (10, 4), (20, 8)]
        let ranges = pairs.map { offset, length in
            Keel_Control_V1_ByteRange.with { $0.offset = offset << 20; $0.length = length << 20 }
        }
        let union = VolumeStartup.union(ranges, size: 12 << 20)
        #expect(union.map { [$0.offset >> 20, $0.length >> 20] } == [[0, 6], [10, 2]])
    }
}

@Suite struct DegradedStartTests {
    @Test func allowDegradedAcceptsAMinorityOfTheNewestMembers() throws {
        let pair = Keel_Control_V1_Membership.with { $0.epoch = 1; $0.generation = 2; $0.members = ["a", "b"] }
        #expect(throws: EngineError.self) { try VolumeStartup.members([("a", pair), nil]) }
        #expect(try VolumeStartup.members([("a", pair), nil], allowDegraded: true) == [0])
    }
}
