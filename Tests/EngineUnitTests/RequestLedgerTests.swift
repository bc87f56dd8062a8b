@testable import Engine
import Logging
import NBDProtocol
import NBDServer
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The request ledger on its own: counts, phases and answers, with no transport.
@Suite struct RequestLedgerTests {
    static func replicas(_ count: Int) -> ReplicaSet {
        ReplicaSet((0..<count).map {
            ReplicaSet.Replica(address: .unix(path: "r\($0)"), controlAddress: .unix(path: "r\($0).control"),
                               id: "replica-\($0)", mode: .rw)
        }, logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
    }

    static func write(at offset: UInt64, gate: WriteGate) -> UnsafeMutablePointer<IORequest> {
        let r = UnsafeMutablePointer<IORequest>.allocate(capacity: 1)
        r.initialize(to: IORequest())
        r.pointee.command = .write
        r.pointee.offset = offset
        r.pointee.length = 4096
        RequestLedger.begin(r)
        return r
    }

    /// Found by the simulator (seed 883): a write answered by replica 1 alone
    /// (replica 0 already failed) was acknowledged although replica 1 had
    /// failed another request in the meantime; with no RW replica the
    /// membership "persisted" on none, and after a restart the write was gone.
    @Test func aWriteWhoseOnlyReplicaFailedSinceIsAnsweredEIO() {
        let replicas = Self.replicas(2)
        let gate = WriteGate(size: 1 << 20)
        replicas.fail(0, reason: "gone")
        replicas.persisted(generation: replicas.generation)
        #expect(gate.admit(offset: 0, length: 4096) == false)  // the region gets marked first
        gate.marked(gate.takeRegionsToMark())
        #expect(gate.admit(offset: 0, length: 4096))
        let r = Self.write(at: 0, gate: gate)
        RequestLedger.admit(r)
        RequestLedger.holdWhileIssuing(r)
        #expect(RequestLedger.send(r) { .sent })
        #expect(!RequestLedger.releaseIssuingHold(r))
        replicas.fail(1, reason: "a FLUSH failed")
        replicas.persisted(generation: replicas.generation)  // on no replica: none is writable
        #expect(RequestLedger.commandFinished(r, replica: 1, error: 0, replicas: replicas) == .last)
        #expect(RequestLedger.settle(r, replicas: replicas, gate: gate) == .answer)
        #expect(r.pointee.firstError == .io)
        r.deallocate()
    }

    @Test func aWriteAnsweredByAHealthyReplicaWaitsForTheMembershipThenSucceeds() {
        let replicas = Self.replicas(2)
        let gate = WriteGate(size: 1 << 20)
        _ = gate.admit(offset: 0, length: 4096)
        gate.marked(gate.takeRegionsToMark())
        #expect(gate.admit(offset: 0, length: 4096))
        let r = Self.write(at: 0, gate: gate)
        RequestLedger.admit(r)
        RequestLedger.holdWhileIssuing(r)
        #expect(RequestLedger.send(r) { .sent } && RequestLedger.send(r) { .sent })
        #expect(!RequestLedger.releaseIssuingHold(r))
        #expect(RequestLedger.commandFinished(r, replica: 0, error: 0, replicas: replicas) == .pending)
        #expect(RequestLedger.commandFinished(r, replica: 1, error: EIO, replicas: replicas) == .last)
        #expect(RequestLedger.settle(r, replicas: replicas, gate: gate) == .hold)
        replicas.persisted(generation: replicas.generation)
        RequestLedger.release(r, replicas: replicas)
        #expect(r.pointee.firstError == nil)
        r.deallocate()
    }

    @Test func aCommandCompletedInsideItsSubmitLeavesTheRequestToItsIssuingHold() {
        let replicas = Self.replicas(1)
        let gate = WriteGate(size: 1 << 20)
        let r = Self.write(at: 0, gate: gate)
        r.pointee.command = .flush
        RequestLedger.holdWhileIssuing(r)
        let sent = RequestLedger.send(r) {
            #expect(RequestLedger.commandFinished(r, replica: 0, error: ENOTCONN, replicas: replicas) == .pending)
            return .completedInside
        }
        #expect(sent)
        #expect(RequestLedger.releaseIssuingHold(r))
        #expect(RequestLedger.settle(r, replicas: replicas, gate: gate) == .hold)
        r.deallocate()
    }

    /// Found by the simulator (seeds 1630, 1178): a read sent to a replica that then failed
    /// (another request's error) and was added again at once ran only after the new rebuild's
    /// chain copy had rewritten that replica's head, and its old data was answered to the client.
    /// An answer from a replica that has left RW is read again from another.
    @Test func aReadAnsweredByAReplicaThatLeftRWIsReadAgainElsewhere() {
        let replicas = Self.replicas(2)
        let r = Self.write(at: 0, gate: WriteGate(size: 1 << 20))
        r.pointee.command = .read
        RequestLedger.holdWhileIssuing(r)
        #expect(RequestLedger.send(r) { .sent })
        #expect(!RequestLedger.releaseIssuingHold(r))
        replicas.fail(0, reason: "a FLUSH failed")
        #expect(RequestLedger.commandFinished(r, replica: 0, error: 0, replicas: replicas) == .retryRead)
        #expect(r.pointee.progress == 0, "its data does not count")
        #expect(RequestLedger.commandFinished(r, replica: 1, error: 0, replicas: replicas) == .last)
        #expect(r.pointee.progress == 1)
        r.deallocate()
    }
}
