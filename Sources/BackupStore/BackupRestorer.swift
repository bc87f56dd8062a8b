import Foundation
import LibNBD
#if canImport(Glibc)
import Glibc
#endif

/// Where a restore writes: a new file (holes where the volume was zero), or an NBD export
/// at least the volume's size (zeroed where the volume was zero, as the export may hold old data).
public enum RestoreDestination: Sendable {
    case file(String)
    case nbd(String)
}

/// What a restore moved: blocks written (fetched, checked, written) and blocks zeroed.
public struct RestoreReport: Sendable {
    public var blocksWritten = 0
    public var bytesWritten: UInt64 = 0
    public var blocksZeroed = 0
}

/// One backup read back: each block fetched in parallel, checked against its hash, written once.
public struct BackupRestorer {
    public var store: BackupStore
    public var id: String
    public var parallel = 8
    /// What the destination holds already (a new volume: nothing; a volume restored from an older
    /// backup of the chain: that backup's map): only blocks that differ are written, and only blocks
    /// it holds are zeroed. Nil for an NBD export of unknown content: every block written or zeroed.
    public var baseline: BlockMap?

    public init(store: BackupStore, id: String) {
        self.store = store
        self.id = id
    }

    @discardableResult
    public func run(to destination: RestoreDestination, progress: (TransferProgress) -> Void = { _ in }) throws -> RestoreReport {
        _ = try store.summary(id)  // an unknown id gets its one-line answer before anything is made
        let map = try store.map(id)
        var holds = baseline
        if case .file = destination { holds = BlockMap(id: "", size: map.size, blockSize: map.blockSize, blocks: []) }  // a new file: all holes
        if let holds {
            precondition(holds.size == map.size && holds.blockSize == map.blockSize, "a baseline describes the same volume layout")
        }
        let named = Set(map.blocks.map(\.index))
        let held = holds.map { Dictionary(uniqueKeysWithValues: $0.blocks.map { ($0.index, $0.hash) }) }
        let toWrite = held.map { held in map.blocks.filter { held[$0.index] != $0.hash } } ?? map.blocks
        let toZero = (holds.map { $0.blocks.map(\.index) } ?? Array(0 ..< map.blockCount)).filter { !named.contains($0) }

        let writers = try openWriters(destination, size: map.size, count: max(1, min(parallel, toWrite.count)))
        let shared = SharedTransfer(total: toWrite.reduce(0) { $0 + UInt64(map.length(of: $1.index)) })
        let group = WorkerThreads(count: writers.count) { worker in
            let writer = writers[worker]
            // Two buffers: the next block is fetched and checked while the last one's write is in flight.
            let buffers = (0 ..< 2).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: map.blockSize, alignment: 4096) }
            var inFlight: (cookies: [Int64], length: Int)?
            defer {
                // Freed only once nothing in flight reads them (after a failure they are left, not freed under libnbd).
                if inFlight.map({ (try? writer.wait($0.cookies)) != nil }) ?? true { buffers.forEach { $0.deallocate() } }
            }
            do {
                var slot = 0
                while let entry = shared.next(of: toWrite) {
                    let length = map.length(of: entry.index)
                    let buffer = UnsafeMutableRawBufferPointer(rebasing: buffers[slot][0 ..< length])
                    try store.block(entry.hash, into: buffer)
                    let cookies = try writer.start(UnsafeRawBufferPointer(buffer), at: UInt64(entry.index) * UInt64(map.blockSize))
                    if let previous = inFlight {
                        try writer.wait(previous.cookies)
                        shared.add(read: UInt64(previous.length))
                    }
                    inFlight = (cookies, length)
                    slot ^= 1
                }
                if let last = inFlight {
                    try writer.wait(last.cookies)
                    shared.add(read: UInt64(last.length))
                    inFlight = nil
                }
            } catch {
                shared.fail(error)
            }
        }
        while group.wait(timeout: .now() + .milliseconds(500)) == .timedOut { progress(shared.progress) }
        if let error = shared.error {
            writers.forEach { $0.abandon() }
            throw error
        }
        progress(shared.progress)
        try writers[0].zero(toZero, map: map)
        for writer in writers { try writer.finish() }
        return RestoreReport(blocksWritten: toWrite.count, bytesWritten: shared.progress.bytesRead, blocksZeroed: toZero.count)
    }

    private func openWriters(_ destination: RestoreDestination, size: UInt64, count: Int) throws -> [RestoreWriter] {
        switch destination {
        case .file(let path):
            let file = try RestoreFile(path: path, size: size)
            return [RestoreWriter](repeating: file, count: count)
        case .nbd(let uri):
            return try (0 ..< count).map { _ in try RestoreExport(uri: uri, size: size) }
        }
    }
}

class RestoreWriter: @unchecked Sendable {
    /// Starts writing `bytes` (valid until `wait`); returns what to wait for (nothing when already written).
    func start(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws -> [Int64] { fatalError("abstract") }
    func wait(_ cookies: [Int64]) throws {}
    /// Makes the blocks not in the map read as zeros.
    func zero(_ blocks: [Int], map: BlockMap) throws {}
    func finish() throws {}
    /// After a failure: nothing half-made stays visible.
    func abandon() {}
}

/// A restore into a new file: made under a temporary name, synced, then renamed into place.
final class RestoreFile: RestoreWriter, @unchecked Sendable {
    let path: String
    let temporary: String
    let fd: Int32
    private var finished = false
    private let lock = NSLock()

    init(path: String, size: UInt64) throws {
        guard access(path, F_OK) != 0 else { throw BackupStoreError("\(path) exists; restore into a new file (or remove it first)") }
        self.path = path
        let directory = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        temporary = (directory.isEmpty ? "" : directory) + "/.restore-\(UInt32.random(in: 0 ... .max))"
        fd = open(temporary, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw BackupStoreError("cannot create \(path): \(String(cString: strerror(errno)))") }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let error = BackupStoreError("cannot size \(path) to \(size) bytes: \(String(cString: strerror(errno)))")
            close(fd)
            unlink(temporary)
            throw error
        }
    }

    override func start(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws -> [Int64] {
        var done = 0
        while done < bytes.count {
            let count = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if count < 0 {
                if errno == EINTR { continue }
                throw BackupStoreError("cannot write \(path): \(String(cString: strerror(errno)))")
            }
            done += count
        }
        return []
    }

    override func finish() throws {
        try lock.withLock {
            guard !finished else { return }
            finished = true
            guard fsync(fd) == 0, rename(temporary, path) == 0 else {
                let error = BackupStoreError("cannot finish \(path): \(String(cString: strerror(errno)))")
                close(fd)
                unlink(temporary)
                throw error
            }
            close(fd)
        }
    }

    override func abandon() {
        lock.withLock {
            guard !finished else { return }
            finished = true
            close(fd)
            unlink(temporary)
        }
    }
}

/// A restore into an NBD export (a volume's engine, say): one connection per worker.
final class RestoreExport: RestoreWriter, @unchecked Sendable {
    let uri: String
    let client: NBDClient

    init(uri: String, size: UInt64) throws {
        self.uri = uri
        client = try NBDClient()
        do { try client.connect(uri: uri) } catch { throw BackupStoreError("cannot write \(uri): \(error)") }
        guard !client.isReadOnly else { throw BackupStoreError("\(uri) is read-only; restore into a writable export") }
        let exportSize = try client.size
        guard exportSize >= size else {
            throw BackupStoreError("\(uri) holds \(exportSize) bytes, the backup \(size); restore into an export at least as large")
        }
    }

    override func start(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws -> [Int64] {
        do { return try client.startWriteInPieces(bytes, at: offset, piece: BlockCodec.transferPiece) } catch {
            throw BackupStoreError("writing \(uri) at \(offset): \(error)")
        }
    }

    override func wait(_ cookies: [Int64]) throws {
        do { try client.waitForAll(cookies) } catch { throw BackupStoreError("writing \(uri): \(error)") }
    }

    override func zero(_ blocks: [Int], map: BlockMap) throws {
        for index in blocks {
            let offset = UInt64(index) * UInt64(map.blockSize), length = UInt64(map.length(of: index))
            do {
                if client.canZero { try client.zero(count: length, at: offset) } else {
                    try client.write([UInt8](repeating: 0, count: Int(length)), at: offset)
                }
            } catch { throw BackupStoreError("zeroing \(uri) at \(offset): \(error)") }
        }
    }

    override func finish() throws {
        do {
            try client.flush()
            try client.shutdown()
        } catch { throw BackupStoreError("finishing the restore into \(uri): \(error)") }
    }
}
