#if canImport(Glibc)
import Glibc
#endif

/// Runs seeds one after another and says how it went. A seed that breaks an
/// invariant, or trips a precondition of the production code (a request
/// answered twice traps), prints the command that replays it.
public enum SimulationRun {
    public struct Outcome: Sendable {
        public var seeds = 0
        public var counts = Simulation.Counts()
        public var failures: [(seed: UInt64, violations: [String])] = []
    }

    public static func replayCommand(seed: UInt64, steps: Int) -> String {
        "swift run keel-sim --seed \(seed) --steps \(steps)"
    }

    public static func run(seeds: [UInt64], steps: Int, trace: ((String) -> Void)? = nil) -> Outcome {
        installTrapMessage()
        var outcome = Outcome()
        var options = Simulation.Options()
        options.steps = steps
        for seed in seeds {
            setTrapMessage("simulator: seed \(seed) trapped; replay: \(replayCommand(seed: seed, steps: steps))\n")
            let simulation = Simulation(seed: seed, options: options)
            simulation.trace = trace
            simulation.run()
            outcome.seeds += 1
            outcome.counts.add(simulation.counts)
            if !simulation.violations.isEmpty { outcome.failures.append((seed, simulation.violations)) }
        }
        setTrapMessage("")
        return outcome
    }

    // A trap cannot be caught; its signal handler can still say which seed it was.
    private static let trapMessage = UnsafeMutablePointer<CChar>.allocate(capacity: 256)
    private static var trapHandlerInstalled = false

    private static func setTrapMessage(_ text: String) {
        let bytes = Array(text.utf8.prefix(255))
        for (i, byte) in bytes.enumerated() { trapMessage[i] = CChar(bitPattern: byte) }
        trapMessage[bytes.count] = 0
    }

    private static func installTrapMessage() {
        guard !trapHandlerInstalled else { return }
        trapHandlerInstalled = true
        setTrapMessage("")
        for sig in [SIGILL, SIGTRAP] {
            signal(sig) { sig in
                _ = write(2, SimulationRun.trapMessage, strlen(SimulationRun.trapMessage))
                signal(sig, SIG_DFL)
                raise(sig)
            }
        }
    }
}
