import ControlAPI
import Engine
import Logging
import ReplicaIdentity
import NBDProtocol
import NBDServer
import SeededRandom
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// The replication core under a seeded storm of faults, single-threaded: the
/// production `WriteGate`, `ReplicaSet`, `KeeperCycle`, `RequestLedger`,
/// `RebuildCycle`, `VolumeStartup` and `EpochFence`, with replicas, links and
/// the clock simulated. Every choice comes from the seed, so a seed replays.
///
/// Faults: engine crash, replica crash, power cut (every replica's volatile
/// half lost), link reset, a link that dies inside a submit (libnbd then
/// completes every queued command inside the call), replies delayed and
/// reordered, a replica that fails a FLUSH, overlapping writes, a second
/// engine claiming the replicas while the first still runs, a start that
/// fails half way, a rebuild copy that fails. Replicas the engine does not
/// write to are rebuilt online (`keel replica add`) while the client writes.
///
/// Invariants, checked as the run goes: a block reads as a linearizable
/// register (a write that no write acknowledged before the read was issued
/// supersedes: one issued after its acknowledgement), never a generation not
/// written there; after a crash the same holds for every acknowledged write,
/// after a power cut for every write acknowledged before an acknowledged FLUSH
/// (or with FUA); no write or FLUSH
/// is acknowledged while a membership change is unpersisted; a request is
/// answered once (`RequestLedger`'s preconditions); the replicas that start a
/// volume hold the same data once resynced; a region the gate holds clean
/// holds the same data, volatile and durable, on every healthy replica; a
/// region is cleared only after `KeeperCycle.idleTicks` idle ticks.
public final class Simulation {
    public struct Options: Sendable {
        public var steps = 5_000
        public var blocks = 32
        public var regionBlocks = 8
        public var replicas = 3
        public var maxOutstanding = 8
        public init() {}
    }

    public struct Counts: Sendable, CustomStringConvertible {
        public var steps = 0
        public var acknowledgedWrites = 0
        public var acknowledgedFlushes = 0
        public var readsChecked = 0
        public var blocksCheckedAfterRecovery = 0
        public var engineCrashes = 0
        public var powerCuts = 0
        public var replicaCrashes = 0
        public var linkResets = 0
        public var completedInsideSubmit = 0
        public var failedFlushes = 0
        public var takeovers = 0
        public var failedStarts = 0
        public var rebuildsStarted = 0
        public var rebuildsFinished = 0
        public var snapshotsTaken = 0
        public var snapshotsRemoved = 0

        public mutating func add(_ other: Counts) {
            steps += other.steps
            acknowledgedWrites += other.acknowledgedWrites
            acknowledgedFlushes += other.acknowledgedFlushes
            readsChecked += other.readsChecked
            blocksCheckedAfterRecovery += other.blocksCheckedAfterRecovery
            engineCrashes += other.engineCrashes
            powerCuts += other.powerCuts
            replicaCrashes += other.replicaCrashes
            linkResets += other.linkResets
            completedInsideSubmit += other.completedInsideSubmit
            failedFlushes += other.failedFlushes
            takeovers += other.takeovers
            failedStarts += other.failedStarts
            rebuildsStarted += other.rebuildsStarted
            rebuildsFinished += other.rebuildsFinished
            snapshotsTaken += other.snapshotsTaken
            snapshotsRemoved += other.snapshotsRemoved
        }

        public var description: String {
            "steps \(steps), acknowledged writes \(acknowledgedWrites), flushes \(acknowledgedFlushes), "
                + "reads checked \(readsChecked), blocks checked after recovery \(blocksCheckedAfterRecovery); "
                + "engine crashes \(engineCrashes), power cuts \(powerCuts), replica crashes \(replicaCrashes), "
                + "link resets \(linkResets), completed inside submit \(completedInsideSubmit), "
                + "failed flushes \(failedFlushes), takeovers \(takeovers), starts failed half way \(failedStarts); "
                + "rebuilds started \(rebuildsStarted), promoted \(rebuildsFinished); "
                + "snapshots taken \(snapshotsTaken), removed \(snapshotsRemoved)"
        }
    }

    /// A command on its way to a replica, or the replica's answer on its way back.
    struct Message {
        let engine: SimEngine
        let request: SimRequest
        /// The replica's index in the engine's replica set.
        let slot: Int
        var answer: Int32?
        var data: [UInt64] = []
    }

    let options: Options
    let blockSize: UInt64 = 4096
    var random: SplitMix64
    private(set) var replicas: [SimReplica]
    private var engines: [SimEngine] = []
    private(set) var engine: SimEngine!
    private var network: [Message] = []
    public internal(set) var counts = Counts()
    public private(set) var violations: [String] = []
    /// Says what happens, step by step (`keel-sim --trace`).
    public var trace: ((String) -> Void)?
    private let logger = Logger(label: "keel.sim") { _ in SwiftLogNoOpLogHandler() }

    // The client's history. `clock` orders every issue and answer. Per block:
    // the latest issue time of a write acknowledged, and of one acknowledged
    // durable (before an acknowledged FLUSH was issued, or with FUA): a write
    // acknowledged before that time is superseded. After a recovery, what the
    // block holds is its baseline, as if written and acknowledged then.
    var clock: UInt64 = 1
    private(set) var issuedAt: [UInt64: UInt64] = [0: 0]
    private var ackedAt: [UInt64: UInt64] = [0: 0]
    private(set) var writtenTo: [UInt64: Range<Int>] = [:]
    private(set) var supersededBefore: [UInt64]
    private(set) var durablySupersededBefore: [UInt64]
    private(set) var baseline: [(generation: UInt64, at: UInt64)]
    private var nextGeneration: UInt64 = 1
    private var nextRequest = 0
    private var enginesStarted = 0
    private var outstanding: [SimRequest] = []
    var expectedSnapshots: [String: ExpectedSnapshot] = [:]
    var nextSnapshot = 1

    public init(seed: UInt64, options: Options = Options()) {
        self.options = options
        random = SplitMix64(seed: seed)
        replicas = (0..<options.replicas).map { SimReplica(id: "replica-\($0)", blocks: options.blocks) }
        supersededBefore = Array(repeating: 0, count: options.blocks)
        durablySupersededBefore = supersededBefore
        baseline = Array(repeating: (0, 0), count: options.blocks)
        startEngine(after: nil)
    }

    var volumeSize: UInt64 { UInt64(options.blocks) * blockSize }

    func regions(of span: ByteRange) -> Range<Int> {
        let regionBytes = UInt64(options.regionBlocks) * blockSize
        return Int(span.offset / regionBytes)..<Int((span.end + regionBytes - 1) / regionBytes)
    }

    func blocks(of span: ByteRange) -> Range<Int> { Int(span.offset / blockSize)..<Int(span.end / blockSize) }

    /// The simulated replica behind a message.
    private func target(_ message: Message) -> Int { message.engine.replicaOf[message.slot] }

    func violation(_ text: String) {
        if violations.count < 20 { violations.append("step \(counts.steps): \(text)") }
    }

    /// Runs the steps; stops at the first violation.
    public func run() {
        for _ in 0..<options.steps where violations.isEmpty {
            step()
            counts.steps += 1
        }
        if violations.isEmpty { powerCut() }
    }

    private func step() {
        let roll = random.below(1000)
        switch roll {
        case ..<300 where outstanding.count < options.maxOutstanding:
            issue()
        case ..<850 where !network.isEmpty:
            deliver(random.below(network.count))
        case ..<910:
            for e in engines where !e.crashed {
                e.keeper.persistMembership()
                e.keeper.markRequested()
            }
        case ..<945:
            engine.tick &+= 1
            engine.keeper.tick()
        case ..<960:
            snapshotStep()
        case ..<990:
            rebuildStep()
        case 990...:
            fault()
        default:
            break
        }
        for e in engines where !e.crashed { wake(e) }
        checkCleanRegions()
    }

    // MARK: - The client

    private func issue() {
        let kind: SimRequest.Kind
        switch random.below(10) {
        case 0..<6: kind = .write
        case 6..<8: kind = .read
        default: kind = .flush
        }
        let first = random.below(options.blocks)
        let count = min(1 + random.below(3), options.blocks - first)
        let blocks = kind == .flush ? 0..<options.blocks : first..<first + count
        var generation: UInt64 = 0
        if kind == .write {
            generation = nextGeneration
            nextGeneration += 1
            writtenTo[generation] = blocks
            issuedAt[generation] = clock
        }
        clock += 1
        let request = SimRequest(number: nextRequest, kind: kind, blocks: blocks, generation: generation,
                                 fua: kind == .write && random.chance(perMille: 150), blockSize: blockSize)
        nextRequest += 1
        request.ackedAtIssue = Array(supersededBefore[blocks])
        outstanding.append(request)
        trace?("issue \(kind) \(request.number) blocks \(blocks) gen \(generation)\(request.fua ? " FUA" : "") to \(engine.id)")
        start(request, on: engine)
    }

    /// The engine's answer reaches the client.
    private func answer(_ request: SimRequest, from e: SimEngine) {
        precondition(!request.done, "the client got a second answer")
        request.done = true
        outstanding.removeAll { $0 === request }
        clock += 1
        trace?("answer \(request.kind) \(request.number) from \(e.id): \(request.request.pointee.firstError.map { "\($0)" } ?? "ok")"
               + (request.kind == .read ? " data \(request.readBack)" : ""))
        guard request.request.pointee.firstError == nil else { return }
        switch request.kind {
        case .write, .flush:
            if e.replicas.holdsAcknowledgements {
                violation("\(request.kind) \(request.number) acknowledged while a membership change is unpersisted")
            }
            if request.kind == .flush {
                counts.acknowledgedFlushes += 1
                for (k, b) in request.blocks.enumerated() {
                    durablySupersededBefore[b] = max(durablySupersededBefore[b], request.ackedAtIssue[k])
                }
                return
            }
            counts.acknowledgedWrites += 1
            let issued = issuedAt[request.generation]!
            ackedAt[request.generation] = clock
            for b in request.blocks {
                supersededBefore[b] = max(supersededBefore[b], issued)
                if request.fua { durablySupersededBefore[b] = max(durablySupersededBefore[b], issued) }
            }
        case .read:
            counts.readsChecked += 1
            for (k, b) in request.blocks.enumerated() {
                check(block: b, holds: request.readBack[k], supersededBefore: request.ackedAtIssue[k],
                      "read \(request.number)")
            }
        }
    }

    /// `value` is a write to the block that no write acknowledged in time
    /// superseded: none issued after `value`'s acknowledgement, before `time`.
    func check(block b: Int, holds value: UInt64, supersededBefore time: UInt64, _ what: String) {
        guard value == 0 || writtenTo[value]?.contains(b) == true else {
            violation("\(what): block \(b) holds generation \(value), never written there (corrupt)")
            return
        }
        if value != baseline[b].generation && issuedAt[value]! < baseline[b].at {
            violation("\(what): block \(b) holds generation \(value), from before the recovery that found "
                      + "\(baseline[b].generation) there (lost)")
            return
        }
        var acknowledged = ackedAt[value] ?? .max
        if baseline[b].generation == value { acknowledged = max(acknowledged, baseline[b].at) }
        if acknowledged < max(time, baseline[b].at) {
            violation("\(what): block \(b) holds generation \(value), superseded by a write acknowledged later (lost)")
        }
    }

    // MARK: - The engine (as EngineWorker composes the production parts)

    private func start(_ request: SimRequest, on e: SimEngine) {
        let r = request.request
        RequestLedger.begin(r)
        switch request.kind {
        case .read:
            RequestLedger.holdWhileIssuing(r)
            _ = issueRead(request, on: e)
            if RequestLedger.releaseIssuingHold(r) { answered(request, by: e) }
        case .write:
            admitWrite(request, on: e)
        case .flush:
            RequestLedger.holdWhileIssuing(r)
            fanOut(request, on: e)
            if RequestLedger.releaseIssuingHold(r) { answered(request, by: e) }
        }
    }

    private func admitWrite(_ request: SimRequest, on e: SimEngine) {
        let r = request.request
        if !e.replicas.isFenced {
            guard e.gate.admit(offset: r.pointee.offset, length: UInt64(r.pointee.length)) else {
                e.parked.append(request)
                return
            }
            RequestLedger.admit(r)
            request.admitted = true
        }
        RequestLedger.holdWhileIssuing(r)
        fanOut(request, on: e)
        if RequestLedger.releaseIssuingHold(r) { answered(request, by: e) }
    }

    private func fanOut(_ request: SimRequest, on e: SimEngine) {
        guard !e.replicas.isFenced else { return }
        let offset = request.request.pointee.offset
        for i in e.replicas.replicas.indices where e.replicas.mode(i).isWritable {
            if request.kind == .write && !e.replicas.takesWrite(i, at: offset) { continue }
            _ = send(request, on: e, to: i)
        }
    }

    private func issueRead(_ request: SimRequest, on e: SimEngine) -> Bool {
        guard !e.replicas.isFenced else { return false }
        let n = e.replicas.replicas.count
        for step in 0..<n {
            let i = (e.nextReader + step) % n
            if e.replicas.mode(i) == .rw && send(request, on: e, to: i) {
                e.nextReader = i + 1
                return true
            }
        }
        return false
    }

    private func send(_ request: SimRequest, on e: SimEngine, to i: Int) -> Bool {
        guard e.linkAlive[i] else { return false }
        return RequestLedger.send(request.request) {
            if random.chance(perMille: 3) {
                // libnbd finds the link dead inside the submit and completes every
                // queued command, this one first, before the call returns.
                counts.completedInsideSubmit += 1
                finished(request, by: e, replica: i, error: ENOTCONN)
                linkDied(e, i)
                return .completedInside
            }
            network.append(Message(engine: e, request: request, slot: i))
            return .sent
        }
    }

    /// One replica answered one command.
    private func finished(_ request: SimRequest, by e: SimEngine, replica i: Int, error: Int32) {
        switch RequestLedger.commandFinished(request.request, replica: i, error: error, replicas: e.replicas) {
        case .pending: break
        case .retryRead: e.readRetries.append(request)
        case .last: answered(request, by: e)
        }
    }

    private func answered(_ request: SimRequest, by e: SimEngine) {
        switch RequestLedger.settle(request.request, replicas: e.replicas, gate: e.gate) {
        case .answer: answer(request, from: e)
        case .hold: e.held.append(request)
        }
        if request.admitted {
            for region in e.gate.regions(offset: request.request.pointee.offset,
                                         length: UInt64(request.request.pointee.length)) {
                e.lastActivity[region] = e.tick
            }
        }
    }

    /// The engine's connection to replica `i` is gone: its commands fail, the replica with them.
    private func linkDied(_ e: SimEngine, _ i: Int) {
        guard e.linkAlive[i] else { return }
        trace?("link \(e.id) to replica \(i) dies")
        e.linkAlive[i] = false
        e.replicas.fail(i, reason: "connection lost")
        var lost: [SimRequest] = []
        network.removeAll { message in
            guard message.engine === e && message.slot == i else { return false }
            lost.append(message.request)
            return true
        }
        for request in lost where !e.crashed {
            finished(request, by: e, replica: i, error: ENOTCONN)
        }
    }

    private func wake(_ e: SimEngine) {
        if !e.readRetries.isEmpty {
            let retries = e.readRetries
            e.readRetries.removeAll()
            for request in retries {
                _ = issueRead(request, on: e)
                if RequestLedger.releaseIssuingHold(request.request) { answered(request, by: e) }
            }
        }
        if !e.parked.isEmpty {
            let waiting = e.parked
            e.parked.removeAll()
            for request in waiting { admitWrite(request, on: e) }
        }
        if !e.held.isEmpty && !e.replicas.holdsAcknowledgements {
            let held = e.held
            e.held.removeAll()
            for request in held {
                RequestLedger.release(request.request, replicas: e.replicas)
                answer(request, from: e)
            }
        }
    }

    // MARK: - The replicas

    private func deliver(_ index: Int) {
        var message = network[index]
        let replica = replicas[target(message)]
        if let error = message.answer {
            network.remove(at: index)
            guard !message.engine.crashed else { return }
            if message.request.kind == .read && error == 0 { message.request.readBack = message.data }
            finished(message.request, by: message.engine, replica: message.slot, error: error)
            return
        }
        precondition(replica.running, "a command reached a replica that is down")
        let epoch = message.engine.epoch
        switch replica.fence.enter(session: epoch) {
        case .wait:
            return
        case .reject:
            message.answer = ESHUTDOWN
        case .admit:
            let request = message.request
            if epoch < replica.epoch {
                violation("a command of epoch \(epoch) reached replica \(target(message)), claimed for epoch \(replica.epoch)")
            }
            switch request.kind {
            case .write:
                replica.write(request.blocks, generation: request.generation, fua: request.fua)
                message.answer = 0
            case .flush:
                if replica.failNextFlush {
                    replica.failNextFlush = false
                    message.answer = EIO
                } else {
                    replica.flush()
                    message.answer = 0
                }
            case .read:
                message.data = Array(replica.volatile[request.blocks])
                message.answer = 0
            }
            replica.fence.leave(session: epoch)
        }
        trace?("replica \(target(message)) \(message.request.kind) \(message.request.number) of \(message.engine.id): "
               + "answer \(message.answer!)")
        network[index] = message
    }

    // MARK: - Online rebuild

    /// The production `RebuildCycle`: one step of every engine's rebuild, or
    /// (`keel replica add`) a rebuild of replicas the newest engine does not write to.
    private func rebuildStep() {
        for e in engines where !e.crashed {
            guard let cycle = e.rebuild else { continue }
            switch cycle.next() {
            case .wait:
                break
            case .copy(let region, let range, let source, let targets):
                cycle.copied(Result {
                    trace?("\(e.id) rebuild: region \(region) from replica \(e.replicaOf[source]) to \(targets.map { e.replicaOf[$0] })")
                    let from = try rebuildLink(e, e.replicaOf[source])
                    for index in targets {
                        // As `Rebuild`: one target's link breaking fails that target alone.
                        let to: SimReplica
                        do { to = try rebuildLink(e, e.replicaOf[index]) } catch {
                            throw RebuildCycle.TargetFailed(index: index, reason: "\(error)")
                        }
                        to.writeHead(blocks(of: range), from.volatile[blocks(of: range)])
                    }
                })
            case .flush(let targets):
                cycle.flushed(Result {
                    for index in targets {
                        do { try rebuildLink(e, e.replicaOf[index]).flush() } catch {
                            throw RebuildCycle.TargetFailed(index: index, reason: "\(error)")
                        }
                    }
                })
            case .finished:
                break
            }
            if cycle.isFinished {
                e.rebuild = nil
                for index in cycle.indexes {
                    if e.replicas.mode(index) == .rw { counts.rebuildsFinished += 1 }
                    trace?("\(e.id) rebuild of replica \(e.replicaOf[index]) ends: \(e.replicas.mode(index)) \(e.replicas.replicas[index].reason)")
                }
            }
            return
        }
        startRebuild(on: engine)
    }

    /// A connection the rebuild copies over, with the engine's claim: refused
    /// by a replica that is down or belongs to a newer engine; sometimes it breaks.
    private func rebuildLink(_ e: SimEngine, _ r: Int) throws -> SimReplica {
        let replica = replicas[r]
        guard replica.running, replica.epoch == e.epoch, !random.chance(perMille: 10) else {
            throw EngineError("the rebuild's connection to replica \(r) failed")
        }
        return replica
    }

    /// As `Rebuild.start`: the replicas must not belong to a newer engine; they
    /// are claimed and join in WO mode, one or two rebuilt in the same pass.
    private func startRebuild(on e: SimEngine) {
        // As `Rebuild.start`, the membership without the replicas is recorded before their chains are copied.
        guard !e.crashed, !e.replicas.isFenced, e.replicas.hasHealthyReplica, e.chainChange == nil,
              !e.replicas.holdsAcknowledgements else { return }
        var candidates = replicas.indices.filter { r in
            replicas[r].running && replicas[r].epoch <= e.epoch
                && !e.indexes(of: r).contains { e.replicas.mode($0).isWritable }
        }
        guard !candidates.isEmpty else { return }
        var indexes: [Int] = []
        for _ in 0..<min(candidates.count, 1 + random.below(2)) {
            let r = candidates.remove(at: random.below(candidates.count))
            let replica = replicas[r]
            replica.epoch = e.epoch
            replica.engine = e.id
            replica.fence.advance(to: e.epoch)
            // `ChainCopy`: the volume's snapshots first, from a healthy member.
            if let source = e.replicas.replicas.indices.first(where: { e.replicas.mode($0) == .rw }) {
                replica.takeChain(of: replicas[e.replicaOf[source]])
            }
            guard let index = try? e.replicas.add(address: .unix(path: "sim-r\(r)"), controlAddress: .unix(path: "sim-r\(r).control"),
                                                  id: replica.id) else { continue }
            e.replicaOf.append(r)
            e.linkAlive.append(true)
            counts.rebuildsStarted += 1
            trace?("\(e.id) rebuilds replica \(r) as index \(index)")
            indexes.append(index)
        }
        guard !indexes.isEmpty else { return }
        e.rebuild = RebuildCycle(indexes: indexes, gate: e.gate, replicas: e.replicas,
                                 metadata: SimMetadata(simulation: self, engine: e, marksAreActivity: false), maxWaits: 100, logger: logger) {}
    }

    // MARK: - Faults

    private func fault() {
        let kind = random.below(7)
        trace?("fault \(kind)")
        switch kind {
        case 0:
            counts.engineCrashes += 1
            restart(powerCut: false)
        case 1:
            powerCut()
        case 2:
            // A replica's process dies, if the volume keeps a healthy replica running.
            let i = random.below(replicas.count)
            let others = replicas.indices.filter { r in
                r != i && replicas[r].running && engine.indexes(of: r).contains { engine.replicas.mode($0) == .rw }
            }
            guard replicas[i].running, !others.isEmpty else { return }
            counts.replicaCrashes += 1
            replicas[i].crash()
            for e in engines {
                for slot in e.indexes(of: i) { linkDied(e, slot) }
            }
            network.removeAll { target($0) == i }
        case 3:
            let i = random.below(engine.linkAlive.count)
            guard engine.linkAlive[i] else { return }
            counts.linkResets += 1
            linkDied(engine, i)
        case 4:
            counts.failedFlushes += 1
            replicas[random.below(replicas.count)].failNextFlush = true
        case 5:
            // A second engine claims the replicas while the first one runs on.
            guard engines.filter({ !$0.crashed }).count < 3 else { return }
            counts.takeovers += 1
            restartReplicas()
            startEngine(after: nil)
        default:
            break
        }
    }

    private func powerCut() {
        counts.powerCuts += 1
        network.removeAll()
        for replica in replicas { replica.powerCut() }
        restart(powerCut: true)
    }

    /// Every engine process dies; the replicas that are down come back; a new engine starts.
    private func restart(powerCut: Bool) {
        for e in engines { e.crashed = true }
        // Answers die with the engine; commands already sent may still reach a replica.
        network.removeAll { $0.answer != nil }
        for request in outstanding { request.done = true }
        outstanding.removeAll()
        restartReplicas()
        startEngine(after: powerCut ? durablySupersededBefore : supersededBefore, powerCut: powerCut)
    }

    private func restartReplicas() {
        for replica in replicas where !replica.running {
            network.removeAll { replicas[target($0)] === replica }
            replica.restart()
        }
    }

    /// The production `VolumeStartup` over links to the simulated replicas:
    /// claim every replica with a new epoch, take the newest membership's
    /// members, make them identical where any holds a dirty mark, clear the
    /// marks, record the membership. The first tries may fail half way (a
    /// replica call fails), as a start does when a replica dies under it; the
    /// next one must still find every acknowledged write. Replicas outside the
    /// membership start ERR, to be rebuilt online. With `floor`, every block
    /// must then read at least that.
    private func startEngine(after floor: [UInt64]?, powerCut: Bool = false) {
        // An engine a newer one takes over gives up its chain change (its control calls would be refused).
        for e in engines where e.chainChange != nil {
            e.gate.resumeWrites()
            e.chainChange = nil
        }
        let addresses = replicas.indices.map { SocketAddress.unix(path: "sim-r\($0)") }
        var started: (VolumeStartup.Outcome, String)?
        for attempt in 0..<Self.startAttempts where started == nil {
            enginesStarted += 1
            let id = "engine-\(enginesStarted)"
            let startup = VolumeStartup(volume: "sim", size: volumeSize, engineID: id, replicaTimeoutSeconds: 1,
                                        logger: logger)
            let links = SimStartupLinks(simulation: self, failures: attempt < Self.startAttempts - 1)
            do {
                started = (try startup.run(links, addresses: addresses, epoch: nil), id)
            } catch let error where links.failed {
                counts.failedStarts += 1
                trace?("\(id) fails to start: \(error)")
            } catch {
                violation("the volume cannot start: \(error)")
                return
            }
        }
        guard let (outcome, id) = started else { return }
        let members = outcome.replicas.replicas.indices.filter { outcome.replicas.mode($0) == .rw }
        let source = replicas[members[0]]
        trace?("\(id) starts at epoch \(outcome.epoch): members \(members), memberships "
               + "\(replicas.map { $0.membership.map { "\($0.epoch).\($0.generation):\($0.members)" } ?? "-" })")
        for i in members.dropFirst() where replicas[i].volatile != source.volatile {
            violation("replicas \(members[0]) and \(i) differ after the resync at epoch \(outcome.epoch)")
            return
        }
        checkSnapshots(members: members, afterPowerCut: powerCut, epoch: outcome.epoch)
        if let floor {
            for b in 0..<options.blocks {
                check(block: b, holds: source.volatile[b], supersededBefore: floor[b], "after recovery at epoch \(outcome.epoch)")
                baseline[b] = (source.volatile[b], clock)
            }
            counts.blocksCheckedAfterRecovery += options.blocks
            supersededBefore = Array(repeating: clock, count: options.blocks)
            durablySupersededBefore = supersededBefore
            clock += 1
        }
        let gate = WriteGate(size: volumeSize, regionSize: UInt64(options.regionBlocks) * blockSize)
        let e = SimEngine(epoch: outcome.epoch, id: id, replicas: outcome.replicas, gate: gate,
                          metadata: { SimMetadata(simulation: self, engine: $0) }, logger: logger)
        engines.removeAll { $0.crashed }
        engines.append(e)
        engine = e
    }

    /// Tries of a start; the last one has no injected failures.
    static let startAttempts = 4

    /// A region the gate holds clean must hold the same data on every healthy
    /// replica, in memory and on disk: no engine will ever copy it again. A
    /// region it holds dirty must be marked on every healthy replica.
    private func checkCleanRegions() {
        guard !engine.crashed, !engine.replicas.isFenced else { return }
        let dirty = Set(engine.gate.nonCleanRegions())
        let healthy = engine.replicas.replicas.indices.filter {
            engine.replicas.mode($0) == .rw && replicas[engine.replicaOf[$0]].running
        }.map { engine.replicaOf[$0] }
        guard let first = healthy.first else { return }
        // The write-intent log holds only if every RW replica has every mark: the next
        // start resyncs the union of its members' marks, and the members may be any of them.
        let marked = Set(engine.gate.markedRegions())
        for i in healthy {
            if let region = marked.subtracting(replicas[i].dirty).min() {
                violation("region \(region) is dirty but RW replica \(i) holds no mark for it")
                return
            }
        }
        let views = healthy.map { (volatile: replicas[$0].volatile, durable: replicas[$0].durable) }
        var cleanBlocks: [Range<Int>] = []
        for region in 0..<engine.gate.regionCount where !dirty.contains(region) {
            let blocks = region * options.regionBlocks..<(region + 1) * options.regionBlocks
            cleanBlocks.append(blocks)
            for k in views.indices.dropFirst() {
                if views[k].volatile[blocks] != views[0].volatile[blocks] || views[k].durable[blocks] != views[0].durable[blocks] {
                    violation("region \(region) is clean but replicas \(first) and \(healthy[k]) differ")
                    return
                }
            }
        }
        if let difference = checkSnapshotsOfHealthyMembers(healthy, cleanBlocks: cleanBlocks) { violation(difference) }
    }
}
