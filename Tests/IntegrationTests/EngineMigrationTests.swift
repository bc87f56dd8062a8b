import Foundation
import Testing

/// `keel migrate start|confirm|rollback` on this host, for a volume whose
/// engine serves no device (`keel volume attach --no-device`): a user-space
/// client on the engine's socket before and after, every write there. The
/// device's switch under fio is in the kernel suite (engine-migration.sh).
@Suite(.serialized) struct EngineMigrationTests {
    let scratch: Scratch
    let state: String

    init() throws {
        scratch = try Scratch()
        state = scratch.file("state")
    }

    func keel(_ arguments: [String]) throws -> Finished {
        try run([Paths.keel] + arguments + ["--state-dir", state], timeout: 180)
    }

    func expectRefusal(_ arguments: [String], mentioning words: [String]) throws {
        let result = try keel(arguments)
        #expect(result.status != 0, "\(arguments) succeeded")
        #expect(result.stderr.split(separator: "\n").count == 1, "\(arguments): \(result.stderr)")
        for word in words { #expect(result.stderr.contains(word), "\(arguments): \(result.stderr)") }
    }

    func engines() throws -> [String] {
        try run(["pgrep", "-af", "engine serve --volume mig "]).stdout.split(separator: "\n").map(String.init)
            .filter { $0.contains(state) }
    }

    @Test func aDetachedVolumesEngineMigratesToAnotherBinaryAndBack() throws {
        #expect(try keel(["volume", "create", "mig", "--size", "16M", "--replicas", "3"]).status == 0)
        defer { _ = try? keel(["volume", "rm", "mig", "--force"]) }
        try expectRefusal(["migrate", "start", "mig"], mentioning: ["no running engine", "keel volume attach mig"])
        try expectRefusal(["migrate", "confirm", "mig"], mentioning: ["no migration", "keel migrate start mig"])
        try expectRefusal(["migrate", "rollback", "mig"], mentioning: ["nothing to roll back"])
        try expectRefusal(["migrate", "start", "mig", "--to", "elsewhere"], mentioning: ["runs its engine on this host", "--engine-node"])

        let attached = try keel(["volume", "attach", "mig", "--no-device"])
        #expect(attached.status == 0, "\(attached.stderr)")
        let uri = attached.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let seed = UInt64.random(in: 1...UInt64(UInt32.max))
        print("engine migration writer seed \(seed)")
        let beforeLog = scratch.file("before.log")
        try StandbyEngineTests.write(uri, offset: 0, log: beforeLog, seed: seed)
        let engineA = try engines()
        #expect(engineA.count == 1)

        // A copy of keel at another path: a live upgrade.
        let upgraded = scratch.file("keel-upgraded")
        try FileManager.default.copyItem(atPath: Paths.keel, toPath: upgraded)
        try expectRefusal(["migrate", "start", "mig", "--binary", scratch.file("missing")], mentioning: ["not an executable"])
        let started = try keel(["migrate", "start", "mig", "--binary", upgraded])
        #expect(started.status == 0 && started.stdout.contains("keel migrate confirm mig"), "\(started.stdout)\(started.stderr)")
        try expectRefusal(["migrate", "start", "mig"], mentioning: ["is running", "keel migrate rollback mig"])
        let status = try keel(["migrate", "status", "mig"])
        #expect(status.stdout.contains("migration_status migrating") && status.stdout.contains("standing by, 50%"), "\(status.stdout)")
        #expect(try engines().count == 2, "A and B beside it")

        let confirmed = try keel(["migrate", "confirm", "mig", "--json"])
        #expect(confirmed.status == 0, "\(confirmed.stderr)")
        let object = try JSONSerialization.jsonObject(with: Data(confirmed.stdout.utf8)) as? [String: Any]
        #expect(object?["epoch"] as? Int == 2 && object?["migration_status"] as? String == "success", "\(confirmed.stdout)")
        let engineB = try engines()
        #expect(engineB.count == 1 && engineB.first?.contains(upgraded) == true && engineB != engineA, "\(engineB)")
        #expect(try keel(["migrate", "status", "mig"]).stdout.contains("migration_status success"))

        // The same URI, now served by B; then everything is there.
        let afterLog = scratch.file("after.log")
        try StandbyEngineTests.write(uri, offset: 1 << 20, log: afterLog, seed: seed + 1)
        for log in [beforeLog, afterLog] {
            let check = try run(["/usr/bin/python3", FreshnessTests.stamp, "check", "--log", log, "--uri", uri], timeout: 120)
            #expect(check.status == 0 && check.stdout.contains("lost 0, corrupt 0"), "seed \(seed): \(check.stdout)\(check.stderr)")
        }

        // A rollback: B goes, the engine serving stays.
        #expect(try keel(["migrate", "start", "mig"]).status == 0)
        let rolledBack = try keel(["migrate", "rollback", "mig"])
        #expect(rolledBack.status == 0 && rolledBack.stdout.contains("rolled back"), "\(rolledBack.stderr)")
        #expect(try engines() == engineB)
        #expect(try keel(["migrate", "status", "mig"]).stdout.contains("rolled back"))

        let detached = try keel(["volume", "detach", "mig"])
        #expect(detached.status == 0, "\(detached.stderr)")
        #expect(try engines().isEmpty, "detach stops the engine B became")
    }

    /// `keel migrate confirm` stopped at a named moment (KEEL_MIGRATION_STOP) while engine B is
    /// killed: before B's activation and after it, the volume ends on engine A (this keel), every
    /// write there, the migration in error saying so.
    @Test func engineBKilledAtAStopPointLeavesTheVolumeOnEngineA() throws {
        #expect(try keel(["volume", "create", "mig", "--size", "16M", "--replicas", "3"]).status == 0)
        defer { _ = try? keel(["volume", "rm", "mig", "--force"]) }
        let uri = try keel(["volume", "attach", "mig", "--no-device"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let upgraded = scratch.file("keel-upgraded")
        try FileManager.default.copyItem(atPath: Paths.keel, toPath: upgraded)
        let seed = UInt64.random(in: 1...UInt64(UInt32.max))
        print("stop point writer seed \(seed)")
        var logs: [String] = []
        for (n, point, says) in [(0, "confirm:a-stopped", "could not take over"), (1, "confirm:activated", "stopped after it took over")] {
            logs.append(scratch.file("w\(n).log"))
            try StandbyEngineTests.write(uri, offset: n << 20, log: logs[n], seed: seed + UInt64(n))
            #expect(try keel(["migrate", "start", "mig", "--binary", upgraded]).status == 0)
            let confirmed = try confirm(stoppingAt: point) {
                _ = try run(["pkill", "-9", "-f", "^\(upgraded) engine serve --volume mig "])
            }
            #expect(confirmed.status != 0 && confirmed.stderr.contains(says) && confirmed.stderr.contains("engine A again"),
                    "\(point): \(confirmed.status) \(confirmed.stdout) \(confirmed.stderr)")
            let status = try keel(["migrate", "status", "mig"]).stdout
            #expect(status.contains("migration_status error") && status.contains(says), "\(point): \(status)")
            if !status.contains("migration_status error") { return }
            let serving = try engines()
            #expect(serving.count == 1 && serving.first?.contains(upgraded) == false, "\(point): \(serving)")
        }
        for (n, log) in logs.enumerated() {
            let check = try run(["/usr/bin/python3", FreshnessTests.stamp, "check", "--log", log, "--uri", uri], timeout: 120)
            #expect(check.status == 0 && check.stdout.contains("lost 0, corrupt 0"), "seed \(seed + UInt64(n)): \(check.stdout)\(check.stderr)")
        }
        #expect(try keel(["volume", "detach", "mig"]).status == 0)
    }

    /// Runs `keel migrate confirm mig` stopped at `point`; `strike` runs while it is stopped there.
    func confirm(stoppingAt point: String, strike: () throws -> Void) throws -> Finished {
        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread { [state] in
            outcome.value = Result { try run([Paths.keel, "migrate", "confirm", "mig", "--state-dir", state], timeout: 180,
                                             environment: ["KEEL_MIGRATION_STOP": point]) }
            done.signal()
        }
        var stopped = false
        for _ in 0..<600 where !stopped {
            let pids = try run(["pgrep", "-f", "migrate confirm mig --state-dir \(state)"]).stdout.split(separator: "\n")
            stopped = pids.contains { (try? String(contentsOfFile: "/proc/\($0)/status", encoding: .utf8))?.contains("(stopped)") == true }
            if stopped {
                try strike()
                for pid in pids { kill(pid_t(pid)!, SIGCONT) }
            } else {
                usleep(100_000)
            }
        }
        #expect(stopped, "keel migrate confirm never stopped at \(point)")
        done.wait()
        return try outcome.value!.get()
    }

    final class Outcome: @unchecked Sendable {  // written by one thread before the semaphore, read after
        var value: Result<Finished, any Error>?
    }
}
