@testable import ReplicaServer
import Testing

@Suite struct EpochFenceTests {
    /// Defect: the replica read its epoch outside the fence's lock (and under
    /// the store's, held across fsyncs); the fence now decides with its own.
    @Test func aClaimedEpochRefusesOlderRequestsAtOnce() {
        let fence = EpochFence(epoch: 5)
        #expect(fence.enter(session: 5) == .admit)
        fence.advance(to: 6)
        #expect(fence.enter(session: 5) == .reject, "no write of a fenced engine is admitted after the claim")
        #expect(fence.enter(session: 6) == .wait, "the older write in flight lands first")
        fence.leave(session: 5)
        #expect(fence.enter(session: 6) == .admit)
        fence.leave(session: 6)
    }

    @Test func aRequestNewerThanTheFenceWaitsForItsClaim() {
        let fence = EpochFence(epoch: 3)
        #expect(fence.enter(session: 4) == .wait)
        fence.advance(to: 4)
        #expect(fence.enter(session: 4) == .admit)
        fence.advance(to: 2)
        #expect(fence.epoch == 4, "the epoch never goes back")
    }
}
