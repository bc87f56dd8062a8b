import Foundation
import LibNBD

/// How far a backup or a restore is: bytes of blocks handled against the bytes to handle.
public struct TransferProgress: Sendable {
    public var bytesDone: UInt64 = 0
    public var bytesTotal: UInt64 = 0
    public var bytesRead: UInt64 = 0
    public var bytesSent: UInt64 = 0
}

/// What a backup starts from: the volume's latest backup in this store, and the blocks changed since its snapshot.
public struct BackupParent: Sendable {
    public var summary: BackupSummary
    public var map: BlockMap
    public var changed: Set<Int>

    public init(summary: BackupSummary, map: BlockMap, changed: Set<Int>) {
        self.summary = summary
        self.map = map
        self.changed = changed
    }
}

/// One backup of a snapshot into a store: reads the blocks it must (all, or those changed since the
/// parent's snapshot), stores each block the store lacks, then writes the map, then the summary.
public struct BackupWriter {
    public var store: BackupStore
    public var source: NBDBackupSource
    public var volume: String
    public var snapshot: String
    public var snapshotTakenForBackup: Bool
    public var parent: BackupParent?
    public var parallel = 8
    public var id = BackupID.make()
    public var schedule: String?
    /// Past it, no block is started and the backup fails (each read and put is bounded by its own timeouts).
    public var deadline: Date?

    public init(store: BackupStore, source: NBDBackupSource, volume: String, snapshot: String, snapshotTakenForBackup: Bool,
                parent: BackupParent?) {
        self.store = store
        self.source = source
        self.volume = volume
        self.snapshot = snapshot
        self.snapshotTakenForBackup = snapshotTakenForBackup
        self.parent = parent
    }

    public func run(progress: (TransferProgress) -> Void = { _ in }) throws -> BackupSummary {
        let target = store.target
        let lockKey = StoreKey.backupLock(id)
        try target.put(lockKey, try store.lockRecord("backup \(id) of \(volume)"))
        defer { try? target.delete([lockKey]) }
        // Written before looking: a gc that starts later sees this lock and refuses (docs/backups.md).
        if let gc = try store.liveLocks(StoreKey.gcLock).first {
            throw BackupStoreError("\(target.url): a gc holds the store (\(gc.lock.holder)); run the backup after it")
        }

        let blockSize = store.config.blockSize
        let size = source.size
        let blockCount = Int((size + UInt64(blockSize) - 1) / UInt64(blockSize))
        let zero = try source.zeroBlocks(blockSize: blockSize)
        var entries: [Int: BlockHash] = [:]
        let incremental = parent.map { $0.map.size == size && $0.map.blockSize == blockSize } ?? false
        let toRead: [Int]
        if incremental, let parent {
            // Blocks not changed since the parent's snapshot are named as the parent names them, unread.
            for entry in parent.map.blocks where !parent.changed.contains(entry.index) && !zero.contains(entry.index) {
                entries[entry.index] = entry.hash
            }
            toRead = parent.changed.filter { !zero.contains($0) && $0 < blockCount }.sorted()
        } else {
            toRead = (0 ..< blockCount).filter { !zero.contains($0) }
        }

        let shared = SharedTransfer(total: toRead.reduce(0) { $0 + UInt64(length(of: $1, size: size)) })
        let workers = max(1, min(parallel, toRead.count))
        let group = WorkerThreads(count: workers) { worker in
            let buffers = BlockBuffers(blockSize: blockSize)
            defer { buffers.deallocate() }  // after the reader's shutdown below: nothing in flight fills them then
            do {
                var (reader, direct) = try self.source.makeReader(preferring: worker)
                defer { try? reader.shutdown() }
                while let index = shared.next(of: toRead) {
                    try self.checkDeadline()
                    let block = buffers.block(length: self.length(of: index, size: size))
                    do { try self.read(block: index, into: block, reader: reader) } catch where direct {
                        // A replica lost mid-backup: the export reads from the others.
                        try? reader.shutdown()
                        (reader, direct) = (try self.source.makeExportReader(), false)
                        try self.read(block: index, into: block, reader: reader)
                    }
                    shared.add(read: UInt64(block.count))
                    shared.record(index, try self.store(UnsafeRawBufferPointer(block), compressingWith: buffers, shared: shared))
                }
            } catch {
                shared.fail(error)
            }
        }
        var lastRefresh = Date()
        while group.wait(timeout: .now() + .milliseconds(500)) == .timedOut {
            progress(shared.progress)
            do { try checkDeadline() } catch { shared.fail(error) }
            if Date().timeIntervalSince(lastRefresh) > 60 {
                try? target.put(lockKey, try store.lockRecord("backup \(id) of \(volume)"))
                lastRefresh = Date()
            }
        }
        if let error = shared.error { throw error }
        progress(shared.progress)
        entries.merge(shared.entries) { _, new in new }

        let map = BlockMap(id: id, size: size, blockSize: blockSize,
                           blocks: entries.sorted { $0.key < $1.key }.map { BlockMap.Entry(index: $0.key, hash: $0.value) })
        let done = shared.progress
        let summary = BackupSummary(
            format: StoreConfig.currentFormat, id: id, volume: volume, size: size, snapshot: snapshot,
            snapshotTakenForBackup: snapshotTakenForBackup, created: Int64(Date().timeIntervalSince1970),
            parent: parent?.summary.id, blockSize: blockSize, blocks: map.blocks.count, newBlocks: shared.newBlocks,
            bytesRead: done.bytesRead, bytesSent: done.bytesSent, incremental: incremental, schedule: schedule)
        // Blocks, then the map, then the summary, each durable before the next: a listed backup is whole.
        try target.makeDurable()
        let encodedMap = try encodeJSON(map)
        try target.put(StoreKey.map(id), try encodedMap.withUnsafeBytes { try BlockCodec.compress($0) })
        try target.makeDurable()
        try target.put(StoreKey.backup(id), try encodeJSON(summary))
        try target.makeDurable()
        return summary
    }

    private func read(block index: Int, into block: UnsafeMutableRawBufferPointer, reader: NBDClient) throws {
        let offset = UInt64(index) * UInt64(store.config.blockSize)
        do { try reader.readInPieces(into: block, at: offset, piece: BlockCodec.transferPiece) } catch {
            throw BackupStoreError("reading \(source.uri) at block \(index): \(error)")
        }
    }

    /// Names the block by its hash and stores it unless this run or the store has it; nil for an all-zero block.
    private func store(_ block: UnsafeRawBufferPointer, compressingWith buffers: BlockBuffers, shared: SharedTransfer) throws -> BlockHash? {
        if BlockCodec.isAllZero(block) { return nil }
        let hash = BlockHash(of: block)
        guard shared.claim(hash) else { return hash }
        if try store.target.exists(StoreKey.block(hash)) { return hash }
        let count = try buffers.compressor.compress(block, into: buffers.compressed)
        try store.target.putDeferred(StoreKey.block(hash), UnsafeRawBufferPointer(rebasing: buffers.compressed[0 ..< count]))
        shared.add(sent: UInt64(count), newBlock: true)
        return hash
    }

    private func checkDeadline() throws {
        guard let deadline, Date() > deadline else { return }
        throw BackupStoreError("backup of \(volume) did not finish before its deadline; nothing of it is listed")
    }

    private func length(of index: Int, size: UInt64) -> Int {
        let blockSize = UInt64(store.config.blockSize)
        return Int(min(blockSize, size - UInt64(index) * blockSize))
    }
}

/// A worker's buffers, reused for every block: a fresh 2 MiB array per block cost page faults and
/// zeroed pages that were a sixth of a backup's CPU.
struct BlockBuffers {
    let read: UnsafeMutableRawBufferPointer
    let compressed: UnsafeMutableRawBufferPointer
    let compressor = BlockCodec.Compressor()

    init(blockSize: Int) {
        read = .allocate(byteCount: blockSize, alignment: 4096)
        compressed = .allocate(byteCount: BlockCodec.compressBound(blockSize), alignment: 4096)
    }

    func block(length: Int) -> UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(rebasing: read[0 ..< length]) }

    func deallocate() {
        read.deallocate()
        compressed.deallocate()
    }
}

/// What a backup's worker threads share: the next block to take, the map so far, the counters, the first failure.
final class SharedTransfer: @unchecked Sendable {
    private let lock = NSLock()
    private var cursor = 0
    private var counters = TransferProgress()
    private var claimed = Set<BlockHash>()
    private(set) var entries: [Int: BlockHash] = [:]
    private(set) var newBlocks = 0
    private(set) var error: Error?

    init(total: UInt64) { counters.bytesTotal = total }

    func next<T>(of items: [T]) -> T? {
        lock.withLock {
            guard error == nil, cursor < items.count else { return nil }
            defer { cursor += 1 }
            return items[cursor]
        }
    }

    /// True for the first worker to meet this hash in this run: it stores the block, the others name it.
    func claim(_ hash: BlockHash) -> Bool { lock.withLock { claimed.insert(hash).inserted } }

    func record(_ index: Int, _ hash: BlockHash?) {
        lock.withLock { entries[index] = hash }
    }

    func add(read: UInt64 = 0, done: UInt64? = nil, sent: UInt64 = 0, newBlock: Bool = false) {
        lock.withLock {
            counters.bytesRead += read
            counters.bytesDone += done ?? read
            counters.bytesSent += sent
            if newBlock { newBlocks += 1 }
        }
    }

    func fail(_ failure: Error) { lock.withLock { if error == nil { error = failure } } }

    var progress: TransferProgress { lock.withLock { counters } }
}
