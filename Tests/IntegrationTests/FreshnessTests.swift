import Foundation
import Testing

/// "Nothing lost" measured by freshness, not only integrity: Tests/Tools/stamp.py
/// stamps every block with a generation and checks after recovery that each
/// block holds a write no acknowledged write superseded (fio's verify cannot
/// see a lost overwrite when time_based or bsrange is set).
@Suite(.serialized) struct FreshnessTests {
    static let stamp = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../Tools/stamp.py").standardized.path
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../..").standardized.path

    /// The checker catches what it claims to: a rewound and a corrupt block.
    @Test func theStampCheckerCatchesALostAndACorruptBlock() throws {
        let result = try run(["bash", Self.repository + "/Tests/Tools/stamp_selftest.sh", Paths.keel], timeout: 120)
        #expect(result.status == 0 && result.stdout.contains("stamp selftest: ok"), "\(result.stdout)\(result.stderr)")
    }

    /// Defect 7, end to end: writes to the same blocks in flight at once on two
    /// connections (the writer keeps several per block) leave every replica,
    /// read alone, with the same and the freshest data.
    @Test func overlappingWritesLeaveTheReplicasIdenticalAndFresh() throws {
        let cluster = try EngineTests.Cluster(replicas: 3, size: "16M")
        let engine = try cluster.startEngine()
        let log = cluster.scratch.file("stamp.log")
        let seed = UInt64.random(in: 1...UInt64(UInt32.max))
        print("overlap writer seed \(seed)")
        let write = try run(["/usr/bin/python3", Self.stamp, "write", "--uri", cluster.uri, "--uri", cluster.uri,
                             "--blocks", "256", "--seconds", "4", "--depth", "16", "--overlap",
                             "--seed", "\(seed)", "--log", log], timeout: 120)
        #expect(write.status == 0, "\(write.stdout)\(write.stderr)")
        #expect(engine.stop() == 0)
        for replica in cluster.replicas { replica.stop() }
        try Self.expectFreshAndIdentical((0..<3).map { cluster.replicaDirectory($0) + "/layers/head.img" }, log: log, seed: seed)
    }

    /// Each replica's head, read alone, holds the freshest write of every block, and all hold the same.
    static func expectFreshAndIdentical(_ heads: [String], log: String, seed: UInt64) throws {
        for head in heads {
            let check = try run(["/usr/bin/python3", stamp, "check", "--log", log, "--file", head], timeout: 120)
            #expect(check.status == 0 && check.stdout.contains("lost 0, corrupt 0"), "seed \(seed), \(head): \(check.stdout)\(check.stderr)")
        }
        let compare = try run(["/usr/bin/python3", stamp, "compare", "--log", log] + heads, timeout: 120)
        #expect(compare.status == 0, "seed \(seed): the replicas differ: \(compare.stdout)")
    }

    /// One round of every fault of the crash soak (Bench/crash-soak runs 100).
    @Test func aShortCrashSoakLosesNothing() throws {
        let soak = try run(["/usr/bin/python3", Self.repository + "/Bench/crash-soak", "--rounds", "7",
                            "--keel", Paths.keel], timeout: 600)
        let summary = soak.stdout.split(separator: "\n").last { $0.hasPrefix("crash-soak:") } ?? ""
        print(summary)
        #expect(soak.status == 0 && summary.contains("lost 0, corrupt 0, diverged 0"), "\(soak.stdout)\(soak.stderr)")
    }
}
