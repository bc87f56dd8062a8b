import Foundation
import SeededRandom
import Testing

/// The real-kernel suite: each test boots Debian's kernel in QEMU
/// (`scripts/kernel-vm/vm.py`, TCG, about 5 s) with the host's root shared
/// read-only, and runs one script of `Tests/KernelScenarios/` inside it, where
/// the replicas, the engine and the kernel device all live. A guest that
/// cannot start fails the test: this suite never skips.
@Suite(.serialized) struct KernelTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../..").standardized.path

    /// Runs a scenario in a fresh guest (which sees the test build's `keel` at
    /// the same path); its output is printed for the CI log.
    /// With `systemd`, the guest boots systemd as PID 1 and runs the scenario as a unit.
    static func scenario(_ name: String, systemd: Bool = false, timeout: Int = 600,
                         arguments: [String] = []) throws -> (status: Int32, output: String) {
        let result = try run(["/usr/bin/python3", repository + "/scripts/kernel-vm/vm.py", "run", "--timeout", "\(timeout)"]
                             + (systemd ? ["--systemd"] : [])
                             + ["--", "sh", repository + "/Tests/KernelScenarios/\(name).sh", Paths.keel] + arguments,
                             timeout: TimeInterval(timeout + 120))
        let output = result.stdout + result.stderr
        print("--- kernel scenario \(name) (exit \(result.status))\n\(output)")
        return (result.status, output)
    }

    /// The scenario exits 0 and its output says `line` (its last words on success).
    static func expectScenario(_ name: String, systemd: Bool = false, timeout: Int = 600, arguments: [String] = [],
                               toSay line: String) throws {
        let result = try scenario(name, systemd: systemd, timeout: timeout, arguments: arguments)
        #expect(result.status == 0)
        #expect(result.output.contains(line))
    }

    @Test func attachMkfsMountDetachAttachVerify() throws {
        try Self.expectScenario("attach-mkfs-mount", toSay: "checksums match")
    }

    @Test func keelAttachesOverNetlinkDetachesAndAttachesAgain() throws {
        try Self.expectScenario("keel-frontend", toSay: "keel frontend: checksums match")
    }

    @Test func engineKilledAndRestartedUnderFioWithoutIOErrors() throws {
        try Self.expectScenario("engine-restart", toSay: "engine restarted under fio without I/O errors")
    }

    /// keel migrate start, rollback, start, confirm under fio on a volume attached with --mapper.
    @Test func engineMigratedLiveUnderFio() throws {
        try Self.expectScenario("engine-migration", toSay: "keel migrate: engine migrated under fio without I/O errors")
    }

    /// Rows 1, 2, 3 and 5 of the Longhorn HA migration matrix, for confirm and for rollback.
    @Test func migrationMatrixRowsOneToThreeAndFive() throws {
        try Self.expectScenario("engine-migration-faults", timeout: 900, toSay: "migration matrix: cells")
    }

    /// keel migrate start --to NODE between engine nodes (network namespaces with their agents), confirm
    /// and rollback; row 7 (engine B's node down), row 8 (engine A's node down) and row 6 (a replica's
    /// node down), confirm and rollback.
    @Test func migrationToAnotherNodeAndMatrixRowsSixToEight() throws {
        try Self.expectScenario("engine-migration-nodes", timeout: 900,
                                toSay: "migration matrix: cells to-c-confirm to-b-rollback 7-confirm-refused-rollback 8-rollback-refused-confirm 6-rollback 6-confirm passed")
    }

    /// Row 4 (every replica crashes) for confirm and rollback, and a seeded, rotating subset of the
    /// repetitions of rows 1-4 with the fault at a named moment (`KEEL_MIGRATION_SEED` replays one;
    /// Bench/migration-matrix runs them all).
    @Test func migrationMatrixRowFourAndRepetitionsAtStopPoints() throws {
        let all = try String(contentsOfFile: Self.repository + "/Tests/KernelScenarios/migration-repetitions.txt", encoding: .utf8)
            .split(separator: "\n").map(String.init).filter { !$0.isEmpty && !$0.hasPrefix("#") }
        let everyRun = ["4-confirm-before", "4-rollback-before"]
        let seed = ProcessInfo.processInfo.environment["KEEL_MIGRATION_SEED"].flatMap { UInt64($0) }
            ?? UInt64.random(in: 1...UInt64(UInt32.max))
        var random = SplitMix64(seed: seed)
        let others = all.filter { !everyRun.contains($0) }
        // One a run (the suite's time budget): over runs the seed rotates it through all of them.
        let chosen = [others[random.below(others.count)]]
        print("migration repetitions: seed \(seed) (KEEL_MIGRATION_SEED replays it): \(chosen.joined(separator: " "))")
        try Self.expectScenario("engine-migration-points", timeout: 900, arguments: everyRun + chosen,
                                toSay: "migration repetitions: \((everyRun + chosen).joined(separator: " ")) passed")
    }

    @Test func fioVerifyOnTheDeviceWhileAReplicaIsKilled() throws {
        try Self.expectScenario("fio-verify-replica-killed", toSay: "fio verified with a replica killed")
    }

    @Test func volumesByNameCreateAttachDetachTakeOverAndRemove() throws {
        try Self.expectScenario("volume-lifecycle", toSay: "keel volume: lifecycle complete")
    }

    @Test func deadLinksAreReplacedWhileAReplicaStallsPastTheIOTimeout() throws {
        try Self.expectScenario("link-dead", toSay: "dead links replaced: fio verified")
    }

    @Test func snapshotsOfAMountedExt4UnderFioAreConsistent() throws {
        try Self.expectScenario("snapshot-ext4", toSay: "snapshots of a mounted ext4: consistent")
    }

    @Test func engineLinksOverKernelTLSServeFioVerify() throws {
        try Self.expectScenario("ktls-links", toSay: "kTLS links: fio verified")
    }

    @Test func frontendKeepsTheDeviceThroughARemoteEnginesRestartAndACutLink() throws {
        try Self.expectScenario("frontend-remote-engine", toSay: "remote engine: fio verified through a restart and a cut link")
    }

    @Test func aVolumeWithItsEngineOnAnotherNodeAttachesAndDetachesThroughItsAgent() throws {
        try Self.expectScenario("volume-engine-node", toSay: "volume with its engine on node b: attached, engine replaced, detached")
    }

    @Test func engineFailsOverToTheNextNodeAndTheOldOneIsFenced() throws {
        // Three engines start in turn under TCG (debug builds): minutes, not seconds.
        try Self.expectScenario("engine-failover", timeout: 1200, toSay: "engine failover: fio verified through a node loss and a fenced split brain")
    }

    /// keel volume under systemd, and keel migrate of such a volume (migration-systemd-steps.sh): engine B as
    /// the other engine unit (keel-engine-alt@), rollback, confirm under fio, the frontend restarting the new
    /// unit, engine A lost while B stands by.
    @Test func volumesUnderSystemdAsPID1AndTheirMigrations() throws {
        let result = try Self.scenario("volume-systemd", systemd: true, timeout: 1200)
        #expect(result.status == 0)
        #expect(result.output.contains("keel migrate under systemd: complete"))
        #expect(result.output.contains("keel volume under systemd: complete"))
    }

    @Test func detachedVolumeBackupsAndAnAttachThatTakesTheBackupsEngineOver() throws {
        try Self.expectScenario("backup-detached", toSay: "detached-volume backups: complete")
    }

    @Test func aVolumesReplicasMoveWhileItIsDetachedAndAttachedAgain() throws {
        try Self.expectScenario("replica-move-attach", toSay: "replica move with detach and attach: ok")
    }
}
