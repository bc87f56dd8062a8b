import LibNBD
#if canImport(Glibc)
import Glibc
#endif

/// Copies byte ranges from one replica to others over plain (blocking) libnbd
/// connections: data is read and written, holes and zeroes become
/// WRITE_ZEROES (BLOCK_STATUS tells which), so sparse regions stay sparse.
/// One read of the source feeds every target.
struct RegionCopier {
    /// A target failed (not the source): `target` is its position in `targets`.
    struct TargetFailure: Error, CustomStringConvertible {
        let target: Int
        let underlying: Error
        var description: String { "\(underlying)" }
    }

    let source: NBDClient
    let targets: [NBDClient]
    /// How long one call to a replica may take before its connection is cut
    /// (`Deadline`): a replica that stopped answering fails that call, and the
    /// failure is that replica's, the source's or one target's.
    let timeoutSeconds: Double
    /// When set, only the blocks this context of the source marks changed
    /// are copied (`keel:changed:<snapshot>`: the target holds that snapshot already).
    var changedContext: String?
    private static let chunk: UInt64 = 1 << 20
    private static let holeOrZero: UInt32 = 1 | 2

    /// Opens a connection to a replica able to answer BLOCK_STATUS (and `changedContext`'s, if given).
    static func connect(changedContext: String? = nil, _ open: (NBDClient) throws -> Void) throws -> NBDClient {
        let client = try NBDClient()
        try client.addMetaContext("base:allocation")
        if let changedContext { try client.addMetaContext(changedContext) }
        try open(client)
        return client
    }

    /// Copies `length` bytes at `offset`; returns how many were data (not holes).
    /// A target's failure throws `TargetFailure`; any other error is the source's.
    @discardableResult
    func copy(offset: UInt64, length: UInt64) throws -> UInt64 {
        guard let changedContext else { return try copyExtents(offset: offset, length: length) }
        guard source.canMetaContext(changedContext) else {
            throw EngineError("the source replica does not offer \(changedContext)")
        }
        var data: UInt64 = 0
        var position = offset
        let end = offset + length
        while position < end {
            let extents = try bounded(source) {
                try source.blockStatus(count: min(end - position, 1 << 30), at: position, context: changedContext)
            }
            guard !extents.isEmpty else { throw EngineError("the source replica sent no \(changedContext) at \(position)") }
            for extent in extents where position < end {
                let count = min(UInt64(extent.length), end - position)
                guard count > 0 else { throw EngineError("the source replica sent an empty extent at \(position)") }
                if extent.flags & 1 != 0 { data += try copyExtents(offset: position, length: count) }
                position += count
            }
        }
        return data
    }

    private func copyExtents(offset: UInt64, length: UInt64) throws -> UInt64 {
        var position = offset
        var data: UInt64 = 0
        let end = offset + length
        while position < end {
            let extents = source.canMetaContext("base:allocation")
                ? try bounded(source) { try source.blockStatus(count: min(end - position, 1 << 30), at: position) }
                : [NBDClient.Extent(length: UInt32(min(end - position, Self.chunk)), flags: 0)]
            guard !extents.isEmpty else { throw EngineError("the source replica sent no block status at \(position)") }
            for extent in extents where position < end {
                let count = min(UInt64(extent.length), end - position)
                guard count > 0 else { throw EngineError("the source replica sent an empty extent at \(position)") }
                if extent.flags & Self.holeOrZero != 0 {
                    try eachTarget { try $0.zero(count: count, at: position) }
                } else {
                    var done: UInt64 = 0
                    while done < count {
                        let piece = min(Self.chunk, count - done)
                        let bytes = try bounded(source) { try source.read(count: Int(piece), at: position + done) }
                        try writeToEveryTarget(bytes, at: position + done)
                        done += piece
                    }
                    data += count
                }
                position += count
            }
        }
        return data
    }

    /// The targets' writes of one piece are in flight together (a copy waits for the slowest
    /// target, not for each in turn), each bounded by its own deadline. Every write has finished
    /// or failed before this returns, so none is left reading `bytes`; the first failure is thrown.
    private func writeToEveryTarget(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { buffer in
            var pending: [(target: Int, cookie: Int64, deadline: Deadline)] = []
            var firstFailure: TargetFailure?
            func failed(_ target: Int, _ error: Error, _ deadline: Deadline) {
                deadline.cancel()
                let reason = deadline.expired ? EngineError("no answer within \(timeoutSeconds) s") : error
                if firstFailure == nil { firstFailure = TargetFailure(target: target, underlying: reason) }
            }
            for (index, target) in targets.enumerated() {
                let deadline = Deadline(seconds: timeoutSeconds, descriptors: [target.descriptor])
                do { pending.append((index, try target.startWrite(buffer, at: offset), deadline)) } catch {
                    failed(index, error, deadline)
                }
            }
            // Bounded: each write completes, fails, or has its connection cut by its deadline.
            while !pending.isEmpty {
                pending = pending.filter { entry in
                    do {
                        guard try targets[entry.target].isComplete(entry.cookie) else { return true }
                        entry.deadline.cancel()
                    } catch {
                        failed(entry.target, error, entry.deadline)
                    }
                    return false
                }
                if pending.isEmpty { break }
                do { try NBDClient.poll(pending.map { targets[$0.target] }, milliseconds: 1000) } catch {
                    // Their connections cut, libnbd fails the writes: the loop retires them.
                    for entry in pending { shutdown(targets[entry.target].descriptor, Int32(SHUT_RDWR)) }
                }
            }
            if let firstFailure { throw firstFailure }
        }
    }

    private func eachTarget(_ body: (NBDClient) throws -> Void) throws {
        for (position, target) in targets.enumerated() {
            do { try bounded(target) { try body(target) } } catch { throw TargetFailure(target: position, underlying: error) }
        }
    }

    /// One call, its connection cut if it takes longer than `timeoutSeconds`.
    private func bounded<T>(_ client: NBDClient, _ call: () throws -> T) throws -> T {
        let deadline = Deadline(seconds: timeoutSeconds, descriptors: [client.descriptor])
        defer { deadline.cancel() }
        do { return try call() } catch where deadline.expired {
            throw EngineError("no answer within \(timeoutSeconds) s")
        }
    }
}
