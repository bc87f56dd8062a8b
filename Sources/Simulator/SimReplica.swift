import ControlAPI
import ReplicaServer

/// A replica in memory: a chain of layers, each with a volatile half (the
/// page cache, what reads see) and a durable half (the disk), and its
/// metadata, durable as soon as it is set (SQLite with synchronous=FULL).
/// FLUSH and the flush before a clear move volatile to durable in every
/// layer; so does the background seal of a layer switched since the start,
/// for that layer; a power cut drops the volatile halves. Blocks hold the generation last written to
/// them (0: never); a layer's nil is "look in the parent" (the bottom layer
/// has none).
final class SimReplica {
    struct Layer {
        /// The snapshot's name; nil for the head.
        var name: String?
        var volatile: [UInt64?]
        var durable: [UInt64?]
        var seal = Seal.sealed
    }

    /// A frozen layer's data on disk, as `ReplicaDevice.switchHead` records it.
    enum Seal {
        case sealed
        /// Switched; the background sync and record have not run yet.
        case sealing
        /// Found switched at a restart, never recorded sealed: it may lack writes.
        case unsealed
    }

    let id: String
    var running = true
    /// Oldest first; the last is the head.
    private(set) var layers: [Layer]
    var epoch: UInt64 = 0
    var engine = ""
    /// Dirty regions, by index.
    var dirty = Set<Int>()
    var membership: Keel_Control_V1_Membership?
    var removedSnapshots: [String] = []
    /// The production fence: which engine's requests may touch the data.
    var fence = EpochFence(epoch: 0)
    /// Fault: the next FLUSH fails with EIO.
    var failNextFlush = false

    init(id: String, blocks: Int) {
        self.id = id
        let zeroes = [UInt64?](repeating: 0, count: blocks)
        layers = [Layer(name: nil, volatile: zeroes, durable: zeroes)]
    }

    private var head: Int { layers.count - 1 }

    /// The volume as layer `top` and those under it read it.
    private func view(upTo top: Int, durable: Bool) -> [UInt64] {
        (0..<layers[0].volatile.count).map { b in
            var k = top
            while true {
                if let value = durable ? layers[k].durable[b] : layers[k].volatile[b] { return value }
                k -= 1
            }
        }
    }

    /// What reads see, and what a power cut would leave.
    var volatile: [UInt64] { view(upTo: head, durable: false) }
    var durable: [UInt64] { view(upTo: head, durable: true) }

    var snapshotNames: [String] { layers.dropLast().map { $0.name! } }
    var unsealedSnapshots: [String] { layers.dropLast().filter { $0.seal != .sealed }.map { $0.name! } }

    /// Snapshot `name` as its export reads it (or as a power cut would leave it).
    func snapshot(_ name: String, durable: Bool = false) -> [UInt64]? {
        layers.firstIndex { $0.name == name }.map { view(upTo: $0, durable: durable) }
    }

    func write(_ blocks: Range<Int>, generation: UInt64, fua: Bool) {
        for b in blocks {
            layers[head].volatile[b] = generation
            if fua { layers[head].durable[b] = generation }
        }
    }

    /// A resync's or rebuild's copy into the head.
    func writeHead(_ blocks: Range<Int>, _ values: ArraySlice<UInt64>) {
        for (b, value) in zip(blocks, values) { layers[head].volatile[b] = value }
    }

    func flush() {
        for k in layers.indices { layers[k].durable = layers[k].volatile }
    }

    /// The background seal after a switch: the layers switched since the
    /// start reach the disk and are recorded sealed.
    func seal() {
        for k in layers.indices.dropLast() where layers[k].seal == .sealing {
            layers[k].durable = layers[k].volatile
            layers[k].seal = .sealed
        }
    }

    /// The switch: the head becomes snapshot `name` and an empty head starts
    /// on it, durably (the switch marker is synced; the frozen data is not).
    func freezeHead(_ name: String) {
        precondition(!snapshotNames.contains(name), "snapshot \(name) frozen twice on \(id)")
        layers[head].name = name
        layers[head].seal = .sealing
        let empty = [UInt64?](repeating: nil, count: layers[0].volatile.count)
        layers.append(Layer(name: nil, volatile: empty, durable: empty))
    }

    /// The merge: the child takes over what it does not hold, from the
    /// layer's page cache, and the child's files are synced (every record
    /// in its log with them); then the layer leaves the chain.
    func removeSnapshot(_ name: String) {
        guard let k = layers.firstIndex(where: { $0.name == name }) else { return }
        var child = layers[k + 1]
        for b in child.volatile.indices where child.volatile[b] == nil {
            child.volatile[b] = layers[k].volatile[b]
        }
        child.durable = child.volatile
        layers[k + 1] = child
        layers.remove(at: k)
        removedSnapshots.append(name)
    }

    /// A rebuild's chain copy (`ChainCopy`): the source's snapshots, each
    /// copied and frozen (synced), under an empty head the rebuild fills.
    func takeChain(of source: SimReplica) {
        let own = volatile.map { Optional($0) }
        let frozen = source.layers.dropLast().map { Layer(name: $0.name, volatile: $0.volatile, durable: $0.volatile) }
        let empty = [UInt64?](repeating: nil, count: own.count)
        // Without snapshots, the head stays the bottom layer, its stale data overwritten by the rebuild.
        layers = frozen.isEmpty ? [Layer(name: nil, volatile: own, durable: own)]
            : frozen + [Layer(name: nil, volatile: empty, durable: empty)]
        removedSnapshots = source.removedSnapshots
    }

    /// kill -9: the process is gone, the page cache is not.
    func crash() {
        running = false
        abandonSeals()
    }

    /// The machine loses power: what was never flushed is gone.
    func powerCut() {
        running = false
        abandonSeals()
        for k in layers.indices { layers[k].volatile = layers[k].durable }
    }

    private func abandonSeals() {
        for k in layers.indices where layers[k].seal == .sealing { layers[k].seal = .unsealed }
    }

    /// Started again: the fence comes back from the durable epoch.
    func restart() {
        running = true
        fence = EpochFence(epoch: epoch)
    }
}
