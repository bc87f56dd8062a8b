import Foundation
import Testing

/// Real power cuts (`Tests/KernelScenarios/power-cut.py`): the guest's disk is
/// served by a host nbdkit whose cache filter keeps writes until a FLUSH, and
/// the power is cut by SIGKILL of QEMU and of that nbdkit while stamped writes
/// run through a Keel volume. Part of the kernel suite (one guest boot each
/// cut, and one to check the last).
extension KernelTests {
    static func powerCut(_ arguments: [String]) throws -> (status: Int32, output: String) {
        let result = try run(["/usr/bin/python3", repository + "/Tests/KernelScenarios/power-cut.py",
                              "--keel", Paths.keel] + arguments, timeout: 1200)
        let output = result.stdout + result.stderr
        print("--- power cut \(arguments.joined(separator: " ")) (exit \(result.status))\n\(output)")
        return (result.status, output)
    }

    /// Every write acknowledged before an acknowledged FLUSH (or with FUA)
    /// reads back after each of five cuts at seeded moments, and the three
    /// replicas, each read alone, are identical.
    @Test func nothingFlushedIsLostAcrossFivePowerCuts() throws {
        let result = try Self.powerCut(["--cuts", "5"])
        #expect(result.status == 0)
        #expect(result.output.contains("power-cut: cuts 5,") && result.output.contains("lost 0, corrupt 0, diverged 0"))
    }

    /// The negative control: replicas that skip their fdatasync
    /// (`KEEL_REPLICA_FAULTS=skip-fdatasync`) lose flushed writes in a cut,
    /// so the test above could see a loss if there were one.
    @Test func replicasThatSkipTheirFdatasyncLoseFlushedWrites() throws {
        let result = try Self.powerCut(["--control", "--cuts", "1"])
        #expect(result.status == 0)
        #expect(result.output.contains("power-cut control: lost"))
    }
}
