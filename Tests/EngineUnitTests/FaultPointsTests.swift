@testable import Engine
import Testing

@Suite struct FaultPointsTests {
    @Test func namedFaultPointsParse() throws {
        let faults = try FaultPoints.parse("break-link-in-submit=1@200,slow-membership=2.5")
        #expect(faults.breakLinkInSubmit?.replica == 1 && faults.breakLinkInSubmit?.command == 200)
        #expect(faults.slowMembershipSeconds == 2.5)
        #expect(faults.enabled)
        #expect(!FaultPoints.none.enabled)
        #expect(try FaultPoints.parse("slow-rebuild=0.1").slowRebuildSeconds == 0.1)
        #expect(try !FaultPoints.parse("slow-rebuild=0.1").enabled, "nothing for the I/O path")
        #expect(try FaultPoints.parse("die-mid-activation").dieMidActivation)
        #expect(try FaultPoints.parse("drop-standby-links=1.5").dropStandbyLinksAfter == 1.5)
        #expect(try FaultPoints.parse("drop-standby-links-when=/tmp/cue").dropStandbyLinksWhen == "/tmp/cue")
        #expect(throws: FaultPoints.Malformed.self) { try FaultPoints.parse("drop-standby-links-when=cue") }
    }

    @Test func malformedFaultPointsAreRefused() {
        for text in ["break-link-in-submit=1", "break-link-in-submit=x@1", "slow-membership=-1", "nonsense"] {
            #expect(throws: FaultPoints.Malformed.self) { try FaultPoints.parse(text) }
        }
    }
}
