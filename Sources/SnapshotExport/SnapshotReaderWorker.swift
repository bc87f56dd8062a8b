import IOUring
import LibNBD
import NBDProtocol
import NBDServer
import RingLinks
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// One I/O thread's half of a snapshot export: its own libnbd connection to
/// every replica, driven from the thread's ring (`RingLink`, as the engine's are). A request goes to one replica; when that one
/// fails, dies or stays silent past the deadline, it moves on to a replica
/// it has not tried, and fails with EIO once none is left. A NOP carrying
/// the request's token hands it back to the server core.
public final class SnapshotReaderWorker: BlockWorker {
    /// One command on one replica; its address is libnbd's callback context, so operations never move.
    struct Operation {
        var worker: Unmanaged<SnapshotReaderWorker>
        var request: UnsafeMutablePointer<IORequest>?
        var token: UInt64
        var link: Int
        var active: Bool
        var sent: UInt64
    }

    private static let deadlineCheck: UInt8 = 3
    private static let blockSize = 256

    private let reader: SnapshotReader
    private let ring: Ring
    private var links: [RingLink]
    private var nextLink = 0
    private lazy var operations = FixedPool<Operation>(blockSize: Self.blockSize) { [unowned self] in
        Operation(worker: .passUnretained(self), request: nil, token: 0, link: 0, active: false, sent: 0)
    }
    /// Requests whose replica failed, issued again once out of libnbd's callbacks.
    private var retries: [(UnsafeMutablePointer<IORequest>, IOToken)] = []
    private var dyingLinks: [Int] = []

    init(reader: SnapshotReader, ring: Ring) {
        precondition(reader.replicas.count <= 64, "tried replicas are a 64-bit mask")
        self.reader = reader
        self.ring = ring
        links = reader.replicas.indices.map { i in reader.connect(i).map { RingLink(client: $0) } ?? .failed }
        ring.timeout(Self.checkInterval(reader), userData: IOToken.worker(0, sub: Self.deadlineCheck).rawValue)
    }

    private static func checkInterval(_ reader: SnapshotReader) -> TimeoutDuration {
        TimeoutDuration(nanoseconds: Int64(reader.timeout / 4))
    }

    // MARK: - BlockWorker

    public func start(_ r: UnsafeMutablePointer<IORequest>, token: IOToken) -> IOStatus {
        defer { settle() }
        switch r.pointee.command {
        case .read, .blockStatus:
            r.pointee.progress = 0  // the replicas tried, as a mask
            return issue(r, token) ? .inFlight : .done(.io)
        default:
            // A read-only export: the policy refused writes already; nothing to flush or cache.
            return .done(nil)
        }
    }

    public func complete(_ r: UnsafeMutablePointer<IORequest>, token: IOToken, result: Int32) -> IOStatus {
        .done(r.pointee.firstError)
    }

    public func workerEvent(token: IOToken, result: Int32, flags: UInt32) {
        defer { settle() }
        if token.sub == Self.deadlineCheck {
            failLateLinks()
            ring.timeout(Self.checkInterval(reader), userData: token.rawValue)
            return
        }
        let i = token.workerIndex
        guard i < links.count, links[i].live != nil else { return }
        links[i].polled(sub: token.sub)
        service(i)
    }

    // MARK: - Issuing

    /// Sends the request to the next replica it has not tried; false when none is left.
    private func issue(_ r: UnsafeMutablePointer<IORequest>, _ token: IOToken) -> Bool {
        for step in 0..<links.count {
            let i = (nextLink + step) % links.count
            let bit = 1 << i
            guard r.pointee.progress & bit == 0, let client = links[i].live else { continue }
            r.pointee.progress |= bit
            let operation = operations.take()
            operation.pointee.request = r
            operation.pointee.token = token.rawValue
            operation.pointee.link = i
            operation.pointee.active = true
            operation.pointee.sent = monotonicNanoseconds()
            do {
                try submit(r, on: client, operation)
            } catch {
                operation.pointee.active = false
                operations.give(operation)
                if !dyingLinks.contains(i) { dyingLinks.append(i) }
                continue
            }
            nextLink = i + 1
            service(i)
            return true
        }
        return false
    }

    private func submit(_ r: UnsafeMutablePointer<IORequest>, on client: NBDClient,
                        _ operation: UnsafeMutablePointer<Operation>) throws {
        let request = r.pointee
        if request.command == .read {
            try client.submit(.read(request.buffer!.base + request.dataOffset, count: Int(request.length), offset: request.offset),
                              function: operationFinished, context: operation)
        } else {
            r.pointee.descriptorCount = 0
            r.pointee.extraDescriptorCount = 0
            try client.submitBlockStatus(count: UInt64(request.length), offset: request.offset,
                                         flags: request.flags.contains(.requestOne) ? .requestOne : [],
                                         extents: extentsArrived, function: operationFinished, context: operation)
        }
    }

    // MARK: - Completion

    fileprivate func finished(_ operation: UnsafeMutablePointer<Operation>, error: Int32) {
        guard operation.pointee.active, let r = operation.pointee.request else { return }
        operation.pointee.active = false
        operations.give(operation)
        let token = IOToken(rawValue: operation.pointee.token)
        if error == 0 {
            ring.nop(userData: token.rawValue)
        } else {
            reader.logger.warning("replica \(reader.replicas[operation.pointee.link]) failed a \(r.pointee.command): errno \(error)")
            retries.append((r, token))
        }
    }

    /// A BLOCK_STATUS answer for one context: kept when the request asked for that context.
    fileprivate func extents(_ operation: UnsafeMutablePointer<Operation>, context: String,
                             _ entries: UnsafeMutablePointer<UInt32>, count: Int) {
        guard operation.pointee.active, let r = operation.pointee.request else { return }
        let pairs = count / 2
        let target: UnsafeMutableRawPointer
        let written: Int
        if context == MetaContext.baseAllocation && r.pointee.wantsAllocation {
            target = r.pointee.buffer!.base
            written = min(pairs, r.pointee.allocationCapacity)
            r.pointee.descriptorCount = written
        } else if r.pointee.extraContext != 0, context == reader.contextName(r.pointee.extraContext) {
            target = r.pointee.extraDescriptors
            written = min(pairs, r.pointee.extraCapacity)
            r.pointee.extraDescriptorCount = written
        } else {
            return
        }
        for k in 0..<written {
            target.storeBigEndian(entries[2 * k], at: 8 * k)
            target.storeBigEndian(entries[2 * k + 1], at: 8 * k + 4)
        }
    }

    /// Outside callbacks: dead links' commands retired, failed requests sent on.
    private func settle() {
        for _ in 0...links.count where !dyingLinks.isEmpty || !retries.isEmpty {
            let dying = dyingLinks
            dyingLinks.removeAll(keepingCapacity: true)
            for i in dying where !links[i].dead { linkDied(i) }
            let waiting = retries
            retries.removeAll(keepingCapacity: true)
            for (r, token) in waiting where !issue(r, token) {
                r.pointee.firstError = .io
                ring.nop(userData: token.rawValue)
            }
        }
    }

    // MARK: - Sockets

    private func service(_ i: Int) {
        if !links[i].service(index: i, ring: ring) && !dyingLinks.contains(i) { dyingLinks.append(i) }
    }

    /// The link is never driven again (its handle stays open, so libnbd never
    /// calls back for its commands); they are retired here and go elsewhere.
    private func linkDied(_ i: Int) {
        links[i].die()
        reader.logger.warning("lost replica \(reader.replicas[i]); reading from the others")
        operations.forEach { operation in
            if operation.pointee.active && operation.pointee.link == i { finished(operation, error: ENOTCONN) }
        }
    }

    private func failLateLinks() {
        let now = monotonicNanoseconds()
        guard now > reader.timeout else { return }
        let deadline = now - reader.timeout
        var late = Set<Int>()
        operations.forEach { operation in
            if operation.pointee.active && operation.pointee.sent < deadline { late.insert(operation.pointee.link) }
        }
        for i in late.sorted() where !links[i].dead { linkDied(i) }
    }
}

private let operationFinished: NBDClient.CompletionFunction = { context, error in
    let operation = context!.assumingMemoryBound(to: SnapshotReaderWorker.Operation.self)
    operation.pointee.worker.takeUnretainedValue().finished(operation, error: error?.pointee ?? 0)
    return 1
}

private let extentsArrived: NBDClient.ExtentFunction = { context, name, _, entries, count, _ in
    guard let name, let entries else { return 0 }
    let operation = context!.assumingMemoryBound(to: SnapshotReaderWorker.Operation.self)
    operation.pointee.worker.takeUnretainedValue().extents(operation, context: String(cString: name), entries, count: count)
    return 0
}
