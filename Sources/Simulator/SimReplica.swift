import ControlAPI
import ReplicaServer

/// A replica in memory: its data in a volatile half (the page cache, what
/// reads see) and a durable half (the disk), and its metadata, durable as
/// soon as it is set (SQLite with synchronous=FULL). FLUSH and the flush
/// before a clear move volatile to durable; a power cut drops the volatile
/// half. Blocks hold the generation last written to them (0: never).
final class SimReplica {
    let id: String
    var running = true
    var volatile: [UInt64]
    var durable: [UInt64]
    var epoch: UInt64 = 0
    var engine = ""
    /// Dirty regions, by index.
    var dirty = Set<Int>()
    var membership: Keel_Control_V1_Membership?
    /// The production fence: which engine's requests may touch the data.
    var fence = EpochFence(epoch: 0)
    /// Fault: the next FLUSH fails with EIO.
    var failNextFlush = false

    init(id: String, blocks: Int) {
        self.id = id
        volatile = Array(repeating: 0, count: blocks)
        durable = volatile
    }

    func write(_ blocks: Range<Int>, generation: UInt64, fua: Bool) {
        for b in blocks {
            volatile[b] = generation
            if fua { durable[b] = generation }
        }
    }

    func flush() { durable = volatile }

    /// kill -9: the process is gone, the page cache is not.
    func crash() { running = false }

    /// The machine loses power: what was never flushed is gone.
    func powerCut() {
        running = false
        volatile = durable
    }

    /// Started again: the fence comes back from the durable epoch.
    func restart() {
        running = true
        fence = EpochFence(epoch: epoch)
    }
}
