import ReplicaIdentity
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
        fence.beginClaim(4)
        #expect(fence.enter(session: 4) == .wait)
        fence.advance(to: 4)
        fence.endClaim(4)
        #expect(fence.enter(session: 4) == .admit)
        fence.advance(to: 2)
        #expect(fence.epoch == 4, "the epoch never goes back")
    }

    /// A standby session's request before its engine's claim: refused, never left waiting.
    @Test func aRequestNewerThanTheFenceWithNoClaimUnderWayIsRefused() {
        let fence = EpochFence(epoch: 3)
        #expect(fence.enter(session: 4) == .reject)
        fence.beginClaim(5)
        #expect(fence.enter(session: 4) == .reject, "only the epoch being claimed waits")
        fence.endClaim(5)
    }
}

@Suite struct VolumeIdentityTests {
    @Test func aRecordedIdentityDecides() {
        let recorded = VolumeIdentity(name: "db", id: "aa")
        #expect(recorded.refusal(of: VolumeIdentity(name: "db", id: "aa")) == nil)
        #expect(recorded.refusal(of: VolumeIdentity(name: "other", id: "aa")) == nil, "renamed, same volume")
        #expect(recorded.refusal(of: VolumeIdentity(name: "db", id: "bb")) != nil, "a reused name")
        #expect(recorded.refusal(of: VolumeIdentity(name: "db"))?.contains("--volume-id aa") == true)
    }

    @Test func aSnapshotReaderNeedsOnlyTheName() {
        let recorded = VolumeIdentity(name: "db", id: "aa")
        #expect(recorded.refusal(ofReaderOf: "db") == nil, "a reader claims nothing: no identity needed")
        #expect(recorded.refusal(ofReaderOf: "other") != nil)
        #expect(VolumeIdentity(name: "").refusal(ofReaderOf: "anything") == nil, "never claimed")
    }

    @Test func withoutAnIdentityTheNameDecides() {
        let recorded = VolumeIdentity(name: "db")
        #expect(recorded.refusal(of: VolumeIdentity(name: "db", id: "aa")) == nil, "the identity is recorded then")
        #expect(recorded.refusal(of: VolumeIdentity(name: "other")) != nil)
        #expect(VolumeIdentity(name: "").refusal(of: VolumeIdentity(name: "anything")) == nil, "never claimed")
        #expect(recorded.recording(VolumeIdentity(name: "db", id: "aa")) == VolumeIdentity(name: "db", id: "aa"))
    }

    @Test func exportNamesRoundTrip() {
        let name = ReplicaExportName(volume: VolumeIdentity(name: "db", id: "0a-1b"), owner: Owner(epoch: 7, engine: "e1"))
        #expect(name.description == "db@7+e1/0a-1b")
        #expect(ReplicaExportName(parsing: name.description) == name)
        #expect(ReplicaExportName(parsing: "db@7")?.owner == Owner(epoch: 7, engine: ""))
        #expect(ReplicaExportName(parsing: "db@9223372036854775808+e") == nil, "an epoch SQLite cannot store")
        #expect(ReplicaExportName(parsing: "db@7+e/not hex") == nil)
        let standby = ReplicaExportName(volume: VolumeIdentity(name: "db", id: "0a"), owner: Owner(epoch: 8, engine: "e2"), standby: true)
        #expect(standby.description == "db@standby:8+e2/0a")
        #expect(ReplicaExportName(parsing: standby.description) == standby)
        #expect(ReplicaExportName(parsing: "db@standby:x+e") == nil)
    }
}
