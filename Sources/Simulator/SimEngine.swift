import Engine
import Logging
import NBDProtocol
import NBDServer
import Syscalls

/// One request of the simulated client, with the production `IORequest` the
/// engine's `RequestLedger` keeps its accounting in.
final class SimRequest {
    enum Kind: Equatable { case write, flush, read }

    let number: Int
    let kind: Kind
    let blocks: Range<Int>
    let generation: UInt64
    let fua: Bool
    let request: UnsafeMutablePointer<IORequest>
    /// Reads and FLUSH: per block, the time before which an acknowledged write was superseded at issue.
    var ackedAtIssue: [UInt64] = []
    /// For reads: what the replica that answered held.
    var readBack: [UInt64] = []
    /// The gate admitted this write: its regions' idle clocks restart when it is answered.
    var admitted = false
    /// The engine answered it (or the client gave it up with its engine).
    var done = false

    init(number: Int, kind: Kind, blocks: Range<Int>, generation: UInt64, fua: Bool, blockSize: UInt64) {
        self.number = number
        self.kind = kind
        self.blocks = blocks
        self.generation = generation
        self.fua = fua
        request = .allocate(capacity: 1)
        request.initialize(to: IORequest())
        request.pointee.command = kind == .write ? .write : kind == .flush ? .flush : .read
        request.pointee.offset = UInt64(blocks.lowerBound) * blockSize
        request.pointee.length = UInt32(UInt64(blocks.count) * blockSize)
        if fua { request.pointee.flags = .fua }
    }

    deinit {
        request.deinitialize(count: 1)
        request.deallocate()
    }
}

/// A simulated engine process: the production `ReplicaSet`, `WriteGate`,
/// `KeeperCycle`, `RequestLedger` and `RebuildCycle`, composed the way
/// `EngineWorker` composes them, with links to the simulated replicas in
/// place of libnbd.
final class SimEngine {
    let epoch: UInt64
    let id: String
    let replicas: ReplicaSet
    let gate: WriteGate
    /// The simulation wakes every engine after each step: no need for the keeper to.
    private(set) var keeper: KeeperCycle!
    var crashed = false
    /// Per index of the replica set: which simulated replica it is (a rebuilt
    /// replica joins under a new index), and whether the link to it lives
    /// (a link that died stays dead: its replica is failed).
    var replicaOf: [Int]
    var linkAlive: [Bool]
    var rebuild: RebuildCycle?
    var parked: [SimRequest] = []
    var held: [SimRequest] = []
    var nextReader = 0
    /// Reads to try on another replica, their pending count standing for the issuing hold.
    var readRetries: [SimRequest] = []
    /// The keeper's idle clock, and each region's last mark or finished write on it.
    var tick: UInt32 = 0
    var lastActivity: [UInt32]
    /// A snapshot being taken or removed, one replica a step.
    var chainChange: ChainChange?

    enum ChainChange {
        /// Writes held; once none is in flight, the slots still to switch, one a step.
        case taking(Snapshot, waits: Int, left: [Int])
        /// Writes go on; the slots still to seal it, one a step, then the membership recorded.
        case sealing(Snapshot, left: [Int])
        case removing(name: String, left: [Int])
    }

    /// A snapshot being taken, and what it must hold.
    struct Snapshot {
        let name: String
        /// Per block, the issue time before which an acknowledged write is superseded (durably).
        let floor: [UInt64]
        let durableFloor: [UInt64]
        let requestedAt: UInt64
    }

    init(epoch: UInt64, id: String, replicas: ReplicaSet, gate: WriteGate,
         metadata: (SimEngine) -> ReplicaMetadata, logger: Logger) {
        self.epoch = epoch
        self.id = id
        self.gate = gate
        self.replicas = replicas
        replicaOf = Array(replicas.replicas.indices)
        linkAlive = replicas.replicas.map { $0.mode == .rw }
        lastActivity = Array(repeating: 0, count: gate.regionCount)
        keeper = KeeperCycle(gate: gate, replicas: replicas, metadata: metadata(self), epoch: epoch,
                             logger: logger) {}
    }

    /// The indexes under which simulated replica `r` is in the set.
    func indexes(of r: Int) -> [Int] { replicaOf.indices.filter { replicaOf[$0] == r } }
}
