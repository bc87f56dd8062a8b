import Engine
import Testing

@Suite struct ChainReconciliationTests {
    @Test func equalChainsNeedNothing() {
        #expect(ChainReconciliation.plan([0: ["a", "b"], 1: ["a", "b"]]) == .init())
        #expect(ChainReconciliation.plan([0: [], 1: []]) == .init())
    }

    /// An engine killed while it took snapshot b: b is frozen where it is missing.
    @Test func replicasMissingTheNewestSnapshotsFreezeThem() {
        let plan = ChainReconciliation.plan([0: ["a", "b"], 1: ["a"], 2: []])
        #expect(plan.freeze == [1: ["b"], 2: ["a", "b"]])
        #expect(plan.diverged.isEmpty)
    }

    @Test func aListThatIsNoPrefixOfTheLongestIsDivergedAndLeftAlone() {
        let plan = ChainReconciliation.plan([0: ["a", "b"], 1: ["a", "c"], 2: ["x"]])
        #expect(plan.diverged == [1, 2])
        #expect(plan.freeze.isEmpty)
    }

    /// An engine killed while it removed the newest snapshot b: the replica that
    /// still holds it removes it; nobody freezes b again (its head is not b's content).
    @Test func aRemovalStoppedHalfWayIsFinishedNotUndone() {
        let plan = ChainReconciliation.plan([0: ["a"], 1: ["a", "b"], 2: ["a", "b"]], removed: [0: ["b"]])
        #expect(plan.remove == [1: ["b"], 2: ["b"]])
        #expect(plan.freeze.isEmpty)
        #expect(plan.diverged.isEmpty)
    }

    @Test func removalsComeBeforeFreezes() {
        let plan = ChainReconciliation.plan([0: ["b", "c"], 1: ["a", "b"]], removed: [0: ["a"]])
        #expect(plan.remove == [1: ["a"]])
        #expect(plan.freeze == [1: ["c"]])
    }
}
