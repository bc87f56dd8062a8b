import Foundation

/// What `keel backup verify` found: each missing or corrupt block, with the backups that name it.
public struct VerifyReport: Sendable {
    public var backups: [String] = []
    public var blocksChecked = 0
    public var missing: [BlockHash: [String]] = [:]
    public var corrupt: [BlockHash: [String]] = [:]
    public var isClean: Bool { missing.isEmpty && corrupt.isEmpty }
}

/// What `keel backup gc` freed.
public struct GCReport: Sendable {
    public var backupsKept = 0
    public var blocksKept = 0
    public var blocksFreed = 0
    public var bytesFreed = 0
    public var orphanMapsRemoved = 0
    public var staleLocksRemoved = 0
    /// Multipart uploads (S3) or temporary files (directory) that writers left unfinished.
    public var uploadsAborted = 0
}

extension BackupStore {
    /// Every block the backups (or the one given) name exists and, unless `quick`, decompresses to its hash.
    public func verify(_ id: String? = nil, quick: Bool = false, parallel: Int = 4) throws -> VerifyReport {
        let summaries = try id.map { [try summary($0)] } ?? backups()
        var report = VerifyReport(backups: summaries.map(\.id))
        var users: [BlockHash: [String]] = [:]
        var lengthOf: [BlockHash: Int] = [:]
        for summary in summaries {
            let map = try map(summary.id)
            for entry in map.blocks {
                users[entry.hash, default: []].append(summary.id)
                lengthOf[entry.hash] = map.length(of: entry.index)
            }
        }
        let lengths = lengthOf
        let hashes = Array(users.keys).sorted()
        report.blocksChecked = hashes.count
        let shared = SharedTransfer(total: 0)
        let findings = Findings()
        let group = WorkerThreads(count: max(1, min(parallel, hashes.count))) { _ in
            do {
                while let hash = shared.next(of: hashes) {
                    if quick {
                        if try !self.target.exists(StoreKey.block(hash)) { findings.add(missing: hash) }
                        continue
                    }
                    guard let stored = try self.target.get(StoreKey.block(hash)) else {
                        findings.add(missing: hash)
                        continue
                    }
                    let sound = (try? BlockCodec.decompress(stored, size: lengths[hash]!))
                        .map { bytes in bytes.withUnsafeBytes { BlockHash(of: $0) } == hash } ?? false
                    if !sound { findings.add(corrupt: hash) }
                }
            } catch {
                shared.fail(error)
            }
        }
        group.wait()
        if let error = shared.error { throw error }
        for hash in findings.missing { report.missing[hash] = users[hash] }
        for hash in findings.corrupt { report.corrupt[hash] = users[hash] }
        return report
    }

    /// Mark and sweep: removes every block no listed backup's map names, the maps of backups that never
    /// finished, and expired locks, and aborts the uploads left unfinished for `staleUploadAge` seconds
    /// (default: a lock's lease). Holds the store's gc lock (written only if absent) and refuses while
    /// a backup holds a live lock, so that no running backup can lose a block it counts on.
    public func collectGarbage(holder: String, staleUploadAge: TimeInterval? = nil) throws -> GCReport {
        let now = Int64(Date().timeIntervalSince1970)
        if try !target.putIfAbsent(StoreKey.gcLock, try lockRecord(holder, now: now)) {
            if let live = try liveLocks(StoreKey.gcLock, now: now).first {
                throw BackupStoreError("\(target.url): another gc holds the store (\(live.lock.holder)); run gc after it")
            }
            // An expired lock of a gc that died: taken over by a fresh conditional write.
            try target.delete([StoreKey.gcLock])
            guard try target.putIfAbsent(StoreKey.gcLock, try lockRecord(holder, now: now)) else {
                throw BackupStoreError("\(target.url): another gc took the store just now; run gc after it")
            }
        }
        defer { try? target.delete([StoreKey.gcLock]) }
        if let backup = try liveLocks(StoreKey.locks + "backup-", now: now).first {
            throw BackupStoreError("\(target.url): a backup is running (\(backup.lock.holder)); run gc after it")
        }

        var report = GCReport()
        // No backup runs now; the age spares the uploads of any other writer still at work.
        report.uploadsAborted = try target.abortStaleUploads(olderThan: staleUploadAge ?? TimeInterval(Self.lockLease))
        let summaries = try backups()
        report.backupsKept = summaries.count
        var marked = Set<BlockHash>()
        for summary in summaries {
            for entry in try map(summary.id).blocks { marked.insert(entry.hash) }
        }
        report.blocksKept = marked.count
        var garbage: [String] = []
        for entry in try target.list(StoreKey.blocks) {
            guard let hash = StoreKey.blockHash(fromKey: entry.key), !marked.contains(hash) else { continue }
            garbage.append(entry.key)
            report.blocksFreed += 1
            report.bytesFreed += entry.size
        }
        let listed = Set(summaries.map(\.id))
        for entry in try target.list(StoreKey.maps) {
            guard let id = StoreKey.mapID(fromKey: entry.key), !listed.contains(id) else { continue }
            garbage.append(entry.key)
            report.orphanMapsRemoved += 1
            report.bytesFreed += entry.size
        }
        for entry in try target.list(StoreKey.locks + "backup-") {
            garbage.append(entry.key)  // none is live: checked above
            report.staleLocksRemoved += 1
        }
        // Batches: one request per 1000 keys on S3.
        var start = 0
        while start < garbage.count {
            try target.delete(Array(garbage[start ..< min(start + 1000, garbage.count)]))
            start += 1000
        }
        try target.makeDurable()
        return report
    }
}

/// What verify's threads found.
private final class Findings: @unchecked Sendable {
    private let lock = NSLock()
    private(set) var missing: [BlockHash] = []
    private(set) var corrupt: [BlockHash] = []
    func add(missing hash: BlockHash) { lock.withLock { missing.append(hash) } }
    func add(corrupt hash: BlockHash) { lock.withLock { corrupt.append(hash) } }
}
