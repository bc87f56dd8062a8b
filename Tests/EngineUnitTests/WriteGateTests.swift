@testable import Engine
import Testing

@Suite struct WriteGateTests {
    @Test func regionsScaleSoThatThereAreAtMost65536() {
        #expect(WriteGate(size: 64 << 20).regionSize == 1 << 20)
        #expect(WriteGate(size: 64 << 20).regionCount == 64)
        let huge = WriteGate(size: 1 << 40)
        #expect(huge.regionSize == 16 << 20 && huge.regionCount == 65536)
        #expect(WriteGate(size: (1 << 20) + 4096).regionCount == 2)
    }

    @Test func spansCoverEveryTouchedRegion() {
        let gate = WriteGate(size: 8 << 20)
        #expect(gate.regions(offset: 0, length: 4096) == 0...0)
        #expect(gate.regions(offset: (1 << 20) - 4096, length: 8192) == 0...1)
        #expect(gate.regions(offset: 3 << 20, length: 1 << 20) == 3...3)
        #expect(gate.regions(offset: (8 << 20) - 1, length: 1) == 7...7)
    }

    @Test func aFirstWriteWaitsUntilTheRegionIsMarked() {
        let gate = WriteGate(size: 4 << 20)
        let pokes = Counter()
        gate.onMarkNeeded = { pokes.add() }
        #expect(!gate.admit(offset: 0, length: 4096))
        #expect(!gate.admit(offset: 8192, length: 4096))
        #expect(pokes.value == 1)
        let toMark = gate.takeRegionsToMark()
        #expect(toMark == [0])
        #expect(gate.takeRegionsToMark().isEmpty)
        gate.marked(toMark)
        #expect(gate.admit(offset: 0, length: 4096))
        #expect(gate.dirtyRegionCount == 1)
        gate.finish(offset: 0, length: 4096)
    }

    @Test func idleRegionsAreClearedAndWritesWaitMeanwhile() {
        let gate = WriteGate(size: 4 << 20)
        _ = gate.admit(offset: 0, length: 4096)
        gate.marked(gate.takeRegionsToMark())
        #expect(gate.admit(offset: 0, length: 4096))
        // In flight: never cleared, however long.
        for _ in 0..<5 { gate.tick() }
        #expect(gate.beginClearing(idleTicks: 3).isEmpty)
        gate.finish(offset: 0, length: 4096)
        // Written recently: not yet.
        #expect(gate.admit(offset: 0, length: 4096))
        gate.finish(offset: 0, length: 4096)
        #expect(gate.beginClearing(idleTicks: 3).isEmpty)
        for _ in 0..<3 { gate.tick() }
        let clearing = gate.beginClearing(idleTicks: 3)
        #expect(clearing == [0])
        #expect(!gate.admit(offset: 0, length: 4096), "a write must not race the clear")
        #expect(gate.takeRegionsToMark().isEmpty, "marking waits for the clear to finish")
        gate.cleared(clearing, succeeded: true)
        #expect(gate.dirtyRegionCount == 0)
        #expect(!gate.admit(offset: 0, length: 4096))
        #expect(gate.takeRegionsToMark() == [0])
    }

    @Test func aRegionBeingCopiedTakesNoWrites() {
        let gate = WriteGate(size: 4 << 20)
        for region in 0..<4 { _ = gate.admit(offset: UInt64(region) << 20, length: 4096) }
        gate.marked(gate.takeRegionsToMark())
        #expect(gate.admit(offset: 1 << 20, length: 4096))
        #expect(!gate.lockForCopy(1), "a write is still in flight")
        #expect(!gate.admit(offset: 1 << 20, length: 4096))
        #expect(gate.admit(offset: 2 << 20, length: 4096), "other regions go on")
        gate.finish(offset: 1 << 20, length: 4096)
        #expect(gate.isQuiet(1))
        gate.unlockCopy()
        #expect(gate.admit(offset: 1 << 20, length: 4096))
    }
}

private final class Counter: @unchecked Sendable {
    var value = 0
    func add() { value += 1 }
}
