import Simulator
import Testing

/// The seeded simulator's CI budget: a fixed list of seeds, each replayable
/// with the command a failure prints (`keel-sim --seed N`). `Bench/sim` runs
/// ten million steps and more.
@Suite struct SimulatorTests {
    @Test func fixedSeedsKeepEveryInvariant() {
        let outcome = SimulationRun.run(seeds: Array(1...200), steps: 5_000)
        print("simulator: seeds \(outcome.seeds), \(outcome.counts)")
        for failure in outcome.failures {
            let replay = SimulationRun.replayCommand(seed: failure.seed, steps: 5_000)
            Issue.record(Comment(rawValue: "seed \(failure.seed): \(failure.violations.joined(separator: "\n"))\nreplay: \(replay)"))
        }
        #expect(outcome.counts.acknowledgedWrites > 50_000)
        #expect(outcome.counts.powerCuts >= 200 && outcome.counts.engineCrashes > 0 && outcome.counts.takeovers > 0)
        #expect(outcome.counts.snapshotsTaken > 200 && outcome.counts.snapshotsRemoved > 200)
    }

    @Test func aSeedReplaysExactly() {
        let first = SimulationRun.run(seeds: [7], steps: 2_000)
        let second = SimulationRun.run(seeds: [7], steps: 2_000)
        #expect(first.counts.description == second.counts.description)
    }
}
