import Engine
import Testing

@Suite struct ChainReconciliationTests {
    private typealias Chain = ChainReconciliation.Chain

    @Test func equalSealedChainsNeedNothing() {
        #expect(ChainReconciliation.plan([0: Chain(names: ["a", "b"]), 1: Chain(names: ["a", "b"])]) == .init())
        #expect(ChainReconciliation.plan([0: Chain(names: []), 1: Chain(names: [])]) == .init())
    }

    /// An engine killed while it took snapshot b: the create was never
    /// answered, and the members that froze b merge it away.
    @Test func aSnapshotSomeMembersLackIsUndone() {
        let plan = ChainReconciliation.plan([0: Chain(names: ["a", "b"]), 1: Chain(names: ["a"]), 2: Chain(names: ["a", "b"])])
        #expect(plan.remove == [0: ["b"], 2: ["b"]])
        #expect(plan.diverged.isEmpty)
    }

    /// A power cut before b was sealed on replica 1: its copy of b may have
    /// lost other writes than the others' copies. b goes from every member.
    @Test func aSnapshotUnsealedOnAnyMemberIsUndoneEverywhere() {
        let plan = ChainReconciliation.plan([0: Chain(names: ["a", "b"]), 1: Chain(names: ["a", "b"], unsealed: ["b"])])
        #expect(plan.remove == [0: ["b"], 1: ["b"]])
    }

    @Test func snapshotsInAnotherOrderAreDivergedAndLeftAlone() {
        let plan = ChainReconciliation.plan([0: Chain(names: ["a", "b"]), 1: Chain(names: ["b", "a"])])
        #expect(plan.diverged == [1])
        #expect(plan.remove.isEmpty)
    }

    /// An engine killed while it removed snapshot a: the member that still holds it removes it too.
    @Test func aRemovalStoppedHalfWayIsFinishedNotUndone() {
        let plan = ChainReconciliation.plan([0: Chain(names: ["b"], removed: ["a"]), 1: Chain(names: ["a", "b"]),
                                             2: Chain(names: ["a", "b"])])
        #expect(plan.remove == [1: ["a"], 2: ["a"]])
        #expect(plan.diverged.isEmpty)
    }
}
