import Glibc
import Syscalls
import Testing

/// `keel replica serve --scheduling`: the policy reaches the threads started after it is set.
@Suite struct SchedulingPolicyTests {
    /// Applies `policy` on a thread of its own (the test runner's keep theirs), then reads the
    /// policy of a thread that one starts.
    private func policyInherited(_ policy: SchedulingPolicy) throws -> Int32 {
        var seen: Int32 = -1
        var failure: Error?
        let outer = try PosixThread(name: "policy") {
            do {
                try policy.applyToThisThread()
                let inner = try PosixThread(name: "inherits") { seen = sched_getscheduler(0) }
                inner.join()
            } catch { failure = error }
        }
        outer.join()
        if let failure { throw failure }
        return seen
    }

    @Test func batchIsInheritedByLaterThreads() throws {
        #expect(try policyInherited(.batch) == 3)  // SCHED_BATCH
    }

    @Test func normalIsTheFairSharePolicy() throws {
        #expect(try policyInherited(.normal) == SCHED_OTHER)
    }
}
