import IOUring
import LibNBD
import NBDProtocol
import NBDServer
import RingLinks
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// One I/O thread's half of the engine: its own libnbd connection to every
/// replica (handles are not thread-safe), driven from the thread's ring by
/// polls on their sockets. When the last replica answers a request, a NOP
/// carrying the request's token hands it back to the server core.
///
/// Writes pass the `WriteGate` first; those it holds back wait in `parked`.
/// Answers to writes wait in `held` while a membership change is being
/// persisted. Both are retried when the device wakes the thread's eventfd.
public final class EngineWorker: BlockWorker {
    /// One command on one replica for one request. The address is what
    /// libnbd gets as callback context, so operations never move.
    struct Operation {
        var worker: Unmanaged<EngineWorker>
        var request: UnsafeMutablePointer<IORequest>?
        var token: UInt64
        var replica: Int
        var active: Bool
        /// When it was sent (CLOCK_MONOTONIC, ns): a replica has `replicaTimeout` to answer.
        var sent: UInt64
    }

    private static let deadlineCheck: UInt8 = 3
    private static let wakeUp: UInt8 = 4
    private static let blockSize = 1024

    private let device: EngineDevice
    private let ring: Ring
    private var links: [RingLink]
    /// This thread's copy of the replicas' modes, refreshed when the set's version moves.
    private var modes: [ReplicaSet.Mode] = []
    private var knownVersion = UInt64.max
    private var parked: [(UnsafeMutablePointer<IORequest>, IOToken)] = []
    private var held: [(UnsafeMutablePointer<IORequest>, IOToken)] = []
    /// Reads that failed on one replica, to try on the next once out of libnbd's callbacks.
    private var readRetries: [(UnsafeMutablePointer<IORequest>, IOToken)] = []
    /// Links found dead while a request was being issued: reaped after it, so a
    /// request never sees its own commands retired before `start` has returned.
    private var dyingLinks: [Int] = []
    private let wake: EventFD
    private let wakeCounter = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    private lazy var operations = FixedPool<Operation>(blockSize: Self.blockSize) { [unowned self] in
        Operation(worker: .passUnretained(self), request: nil, token: 0, replica: 0, active: false, sent: 0)
    }
    private var nextReader = 0
    /// How often outstanding commands are checked against their deadline.
    private let checkInterval: TimeoutDuration
    private let faults: FaultPoints
    /// Commands submitted to each replica by this thread (counted only for fault points).
    private var submitted: [Int]

    init(device: EngineDevice, ring: Ring) throws {
        self.device = device
        self.ring = ring
        checkInterval = TimeoutDuration(nanoseconds: Int64(device.replicaTimeout / 4))
        links = Array(repeating: RingLink(), count: ReplicaSet.capacity)
        faults = device.faults
        submitted = Array(repeating: 0, count: ReplicaSet.capacity)
        wake = try EventFD()
        refreshReplicas()
        device.register(waker: wake)
        ring.readEvent(wake.descriptor, into: wakeCounter, userData: IOToken.worker(0, sub: Self.wakeUp).rawValue)
        ring.timeout(checkInterval, userData: IOToken.worker(0, sub: Self.deadlineCheck).rawValue)
    }

    deinit {
        wakeCounter.deallocate()
    }

    /// Connects to replicas that became writable, drops removed ones.
    private func refreshReplicas() {
        let version = device.replicas.version.load(ordering: .acquiring)
        guard version != knownVersion else { return }
        knownVersion = version
        let replicas = device.replicas.replicas
        modes = replicas.map(\.mode)
        for (i, replica) in replicas.enumerated() {
            if replica.mode.isWritable && links[i].client == nil && !links[i].dead {
                do {
                    links[i] = RingLink(client: try device.connect(i))
                    if replica.mode == .wo { device.workerJoined(i) }
                } catch {
                    links[i] = .failed
                    device.replicas.fail(i, reason: "cannot connect: \(error)")
                }
                service(i)
            } else if replica.mode == .removed && links[i].live != nil {
                linkDied(i)
            }
        }
    }

    // MARK: - BlockWorker

    public func start(_ r: UnsafeMutablePointer<IORequest>, token: IOToken) -> IOStatus {
        defer { settle() }
        RequestLedger.begin(r)
        refreshReplicas()
        switch r.pointee.command {
        case .read:
            issuing(r, token) { _ = issueRead(r, token) }
        case .write, .trim, .writeZeroes:
            admitWrite(r, token)
        case .flush:
            issuing(r, token) { fanOut(r, token, .flush, flags: []) }
        case .cache, .disconnect:
            return .done(nil)
        case .blockStatus:
            // One extent, "allocated": always a correct answer; replicas keep the detail.
            let descriptor = r.pointee.buffer!.base
            descriptor.storeBigEndian(r.pointee.length, at: 0)
            descriptor.storeBigEndian(UInt32(0), at: 4)
            r.pointee.descriptorCount = 1
            return .done(nil)
        }
        return .inFlight
    }

    /// Runs `body`, which submits the request's commands, under the ledger's
    /// issuing hold; answers the request here if nothing is left pending.
    private func issuing(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken, _ body: () -> Void) {
        RequestLedger.holdWhileIssuing(r)
        body()
        if RequestLedger.releaseIssuingHold(r) { answered(r, token) }
    }

    /// Sends a write to every writable replica once the gate lets it; parks it otherwise.
    private func admitWrite(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) {
        let request = r.pointee
        // A fenced engine sends nothing (not even marks): the answer is EIO.
        guard !device.replicas.isFenced else {
            issuing(r, token) {}
            return
        }
        guard device.gate.admit(offset: request.offset, length: UInt64(request.length)) else {
            parked.append((r, token))
            return
        }
        RequestLedger.admit(r)
        var flags: NBDClient.CommandFlags = request.flags.contains(.fua) ? .fua : []
        issuing(r, token) {
            switch request.command {
            case .write:
                let data = UnsafeRawPointer(request.buffer!.base + request.dataOffset)
                fanOut(r, token, .write(data, count: Int(request.length), offset: request.offset), flags: flags)
            case .trim:
                fanOut(r, token, .trim(count: UInt64(request.length), offset: request.offset), flags: flags)
            default:
                // FAST_ZERO is not forwarded: a replica that cannot zero fast
                // would refuse while the others zeroed, and they would differ.
                if request.flags.contains(.noHole) { flags.insert(.noHole) }
                fanOut(r, token, .zero(count: UInt64(request.length), offset: request.offset), flags: flags)
            }
        }
    }

    /// The NOP that says all replicas answered.
    public func complete(_ r: UnsafeMutablePointer<IORequest>, token: IOToken, result: Int32) -> IOStatus {
        device.counters.count(r.pointee.command, length: r.pointee.length, error: r.pointee.firstError)
        return .done(r.pointee.firstError)
    }

    public func workerEvent(token: IOToken, result: Int32, flags: UInt32) {
        defer { settle() }
        if token.sub == Self.deadlineCheck {
            failLateReplicas()
            ring.timeout(checkInterval, userData: token.rawValue)
            return
        }
        if token.sub == Self.wakeUp {
            ring.readEvent(wake.descriptor, into: wakeCounter, userData: token.rawValue)
            refreshReplicas()
            retryParked()
            releaseHeld()
            return
        }
        let i = token.workerIndex
        // A dead link's handle is never driven again: its late replies would
        // complete operations already retired and reused for other requests.
        guard i < links.count, links[i].live != nil else { return }
        links[i].polled(sub: token.sub)
        service(i)
    }

    /// Outside requests and callbacks: retires dead links' commands and retries failed reads
    /// (which may find more dead links; each link dies once, so this ends).
    private func settle() {
        for _ in 0...links.count where !dyingLinks.isEmpty || !readRetries.isEmpty {
            let dying = dyingLinks
            dyingLinks.removeAll(keepingCapacity: true)
            for i in dying where !links[i].dead { linkDied(i) }
            retryReads()
        }
    }

    private func retryReads() {
        guard !readRetries.isEmpty else { return }
        refreshReplicas()
        let waiting = readRetries
        readRetries.removeAll(keepingCapacity: true)
        for (r, token) in waiting {
            // The retry's own pending count is the issuing hold.
            r.pointee.pendingOperations -= 1
            issuing(r, token) { _ = issueRead(r, token) }
        }
    }

    private func retryParked() {
        guard !parked.isEmpty else { return }
        let waiting = parked
        parked.removeAll(keepingCapacity: true)
        for (r, token) in waiting { admitWrite(r, token) }
    }

    /// Answers held back for a membership change, once it is persisted;
    /// with no healthy replica left they fail: no replica is known to hold them.
    private func releaseHeld() {
        guard !held.isEmpty, !device.replicas.holdsAcknowledgements else { return }
        for (r, token) in held {
            RequestLedger.release(r, replicas: device.replicas)
            ring.nop(userData: token.rawValue)
        }
        held.removeAll(keepingCapacity: true)
    }

    // MARK: - Issuing

    private func fanOut(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken, _ command: NBDClient.Command,
                        flags: NBDClient.CommandFlags) {
        guard !device.replicas.isFenced else { return }
        let isWrite = r.pointee.command != .flush
        for i in modes.indices where modes[i].isWritable {
            // A replica being rebuilt gets the writes behind its copy only (the copy brings the rest).
            if isWrite && modes[i] == .wo && !device.replicas.takesWrite(i, at: r.pointee.offset) { continue }
            _ = issue(r, token, command, flags: flags, on: i)
        }
    }

    /// Reads go round robin over healthy replicas; a failed read moves on to the next one.
    private func issueRead(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) -> Bool {
        guard !device.replicas.isFenced else { return false }
        let request = r.pointee
        let command = NBDClient.Command.read(request.buffer!.base + request.dataOffset,
                                             count: Int(request.length), offset: request.offset)
        for step in 0..<modes.count {
            let i = (nextReader + step) % modes.count
            if modes[i] == .rw && issue(r, token, command, flags: [], on: i) {
                nextReader = i + 1
                return true
            }
        }
        return false
    }

    /// Submits one command of the request to replica `i`. True when the
    /// command is accounted for: in flight, or already completed inside the
    /// submit call; false when it never reached libnbd.
    private func issue(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken, _ command: NBDClient.Command,
                       flags: NBDClient.CommandFlags, on i: Int) -> Bool {
        guard let client = links[i].live else { return false }
        let operation = operations.take()
        operation.pointee.request = r
        operation.pointee.token = token.rawValue
        operation.pointee.replica = i
        operation.pointee.active = true
        operation.pointee.sent = monotonicNanoseconds()
        if faults.enabled { injectFaults(before: client, replica: i) }
        let sent = RequestLedger.send(r) {
            do {
                try client.submit(command, flags: flags, function: operationFinished, context: operation)
                return .sent
            } catch {
                guard operation.pointee.active else { return .completedInside }
                operation.pointee.active = false
                operations.give(operation)
                device.replicas.fail(i, reason: "\(error)")
                return .notSent
            }
        }
        if sent { service(i) }
        return sent
    }

    private func injectFaults(before client: NBDClient, replica i: Int) {
        submitted[i] += 1
        if let fault = faults.breakLinkInSubmit, fault.replica == i, fault.command == submitted[i] {
            device.logger.warning("fault point: breaking the link to replica \(i) inside submit")
            shutdown(client.descriptor, Int32(SHUT_RDWR))
        }
    }

    // MARK: - Completion

    fileprivate func finished(_ operation: UnsafeMutablePointer<Operation>, error: Int32) {
        guard operation.pointee.active, let r = operation.pointee.request else { return }
        operation.pointee.active = false
        let token = IOToken(rawValue: operation.pointee.token)
        let replica = operation.pointee.replica
        operations.give(operation)

        switch RequestLedger.commandFinished(r, replica: replica, error: error, replicas: device.replicas) {
        case .pending:
            break
        case .retryRead:
            // Retried later, outside libnbd's callback: issuing from inside it could
            // reach the very handle whose lock the callback holds.
            readRetries.append((r, token))
        case .last:
            answered(r, token)
        }
    }

    /// Every replica involved has answered: hand the request back, or hold the answer.
    private func answered(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) {
        switch RequestLedger.settle(r, replicas: device.replicas, gate: device.gate) {
        case .answer: ring.nop(userData: token.rawValue)
        case .hold: held.append((r, token))
        }
    }

    // MARK: - Sockets

    /// Keeps a poll armed for replies and one for sending while libnbd has bytes queued.
    private func service(_ i: Int) {
        if !links[i].service(index: i, ring: ring) && !dyingLinks.contains(i) { dyingLinks.append(i) }
    }

    /// The connection is gone: the replica is failed and its outstanding commands with it.
    /// The link's commands are retired here, once; its handle stays open but
    /// is never notified again, so libnbd never calls back for them.
    private func linkDied(_ i: Int) {
        links[i].die()
        device.replicas.fail(i, reason: "connection lost")
        operations.forEach { operation in
            if operation.pointee.active && operation.pointee.replica == i { finished(operation, error: ENOTCONN) }
        }
    }

    /// NBD has no timeout of its own: a replica that leaves a command
    /// unanswered past the deadline is failed, and the request goes on without it.
    private func failLateReplicas() {
        let deadline = Self.lateBefore(now: monotonicNanoseconds(), timeout: device.replicaTimeout)
        var late = Set<Int>()
        operations.forEach { operation in
            if operation.pointee.active && operation.pointee.sent < deadline { late.insert(operation.pointee.replica) }
        }
        for i in late.sorted() {
            device.logger.warning("replica \(i) left a command unanswered: \(links[i].diagnostics)")
            device.replicas.fail(i, reason: "no answer within \(device.replicaTimeout / 1_000_000_000) s")
            linkDied(i)
        }
    }

    /// Commands sent before this are late. The monotonic clock starts near 0
    /// at boot: an engine started within `timeout` of it has no late command
    /// yet (a wrapped subtraction failed every replica at once).
    static func lateBefore(now: UInt64, timeout: UInt64) -> UInt64 {
        now > timeout ? now - timeout : 0
    }
}

/// libnbd's completion callback: context is the operation; returning 1 retires the command.
private let operationFinished: NBDClient.CompletionFunction = { context, error in
    let operation = context!.assumingMemoryBound(to: EngineWorker.Operation.self)
    operation.pointee.worker.takeUnretainedValue().finished(operation, error: error?.pointee ?? 0)
    return 1
}
