@testable import Engine
import Testing

/// Found by the power cut's negative control: a guest whose engine served
/// within 30 s of boot failed all three replicas at once, "no answer within
/// 30 s", six seconds after it started.
@Suite struct LateCommandTests {
    @Test func soonAfterBootNoCommandIsLate() {
        let timeout: UInt64 = 30_000_000_000
        #expect(EngineWorker.lateBefore(now: 25_000_000_000, timeout: timeout) == 0)
        #expect(EngineWorker.lateBefore(now: timeout, timeout: timeout) == 0)
    }

    @Test func laterCommandsSentBeforeTheTimeoutAreLate() {
        #expect(EngineWorker.lateBefore(now: 100_000_000_000, timeout: 30_000_000_000) == 70_000_000_000)
    }
}
