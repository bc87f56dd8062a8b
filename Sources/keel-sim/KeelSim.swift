import ArgumentParser
import Simulator

/// `keel-sim`: the replication core's seeded simulator (docs/replication.md).
@main
struct KeelSim: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keel-sim",
        abstract: "Runs Keel's replication core under seeded faults and checks its invariants.")

    @Option(help: "Run this one seed (replays a failure).")
    var seed: UInt64?

    @Option(help: "How many seeds to run, from --first-seed.")
    var seeds = 100

    @Option(help: "The first of the seeds.")
    var firstSeed: UInt64 = 1

    @Option(help: "Steps per seed.")
    var steps = 5_000

    @Flag(help: "With --seed: print every event.")
    var trace = false

    func validate() throws {
        guard steps > 0, seeds > 0 else { throw ValidationError("--steps and --seeds must be positive") }
    }

    func run() throws {
        let list = seed.map { [$0] } ?? (0..<UInt64(seeds)).map { firstSeed + $0 }
        let outcome = SimulationRun.run(seeds: list, steps: steps, trace: trace ? { print($0) } : nil)
        for failure in outcome.failures {
            print("seed \(failure.seed): \(failure.violations.first ?? "")")
            for line in failure.violations.dropFirst() { print("  \(line)") }
            print("  replay: \(SimulationRun.replayCommand(seed: failure.seed, steps: steps))")
        }
        print("simulator: seeds \(outcome.seeds), \(outcome.counts); invariant violations \(outcome.failures.count)")
        if !outcome.failures.isEmpty { throw ExitCode(1) }
    }
}
