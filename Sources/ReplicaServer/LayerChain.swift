import FileExport
import LayerStack
import Dispatch
import Logging
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A replica's chain of layers, open: each layer's data file, the index of
/// what each layer records and where each block is read from, and the head's
/// map log, which the I/O threads append to.
///
/// `freezeHead` changes the layers and the head's log while no request is in
/// the data path (the replica's fence holds them); the I/O threads read
/// `layers` and `headLog` without a lock, after the fence's lock, which
/// orders them after the change.
public final class LayerChain: @unchecked Sendable {
    public struct Layer {
        public let id: LayerID
        public let data: FileDevice
    }

    public struct OpenError: Error, CustomStringConvertible {
        public let description: String
    }

    public let size: UInt64
    public private(set) var layers: [Layer]
    public let index: Mutex<LayerIndex>
    /// The head's map log, written by the I/O threads at `logEnd`.
    private(set) var headLog: FileDescriptor
    private let logEnd: Atomic<Int64>
    /// Serialises the control plane's flushes with a change of head.
    private let control = Mutex(())
    /// See `freezeHead`.
    private let unsynced = Mutex<[FileDescriptor]>([])
    /// Former heads' map logs: kept open (never reused by another file) while a FLUSH may sync them.
    private var frozenLogs: [FileDescriptor] = []
    /// The next head, opened by `prepare`.
    private var prepared: (layer: Layer, log: FileDescriptor)?
    private let logger: Logger

    /// Opens layers given oldest first, the head last, with their files;
    /// replays their map logs (cutting torn tails).
    public init(size: UInt64, layers: [(id: LayerID, files: LayerFiles)], logger: Logger) throws {
        precondition(!layers.isEmpty)
        self.size = size
        self.logger = logger
        var opened: [Layer] = []
        var indexed: [LayerStack.Layer] = []
        for (id, files) in layers {
            opened.append(try Self.open(id: id, files: files, size: size, writable: id == layers.last!.id, logger: logger))
            indexed.append(LayerStack.Layer(id: id, map: try files.loadMap()))
        }
        precondition(zip(opened, opened.dropFirst()).allSatisfy { $0.id < $1.id }, "a chain's layer ids ascend")
        self.layers = opened
        index = Mutex(LayerIndex(layers: indexed))
        headLog = try Self.openLog(layers.last!.files.mapPath)
        logEnd = Atomic(Int64(lseek(headLog.rawValue, 0, SEEK_END)))
    }

    deinit {
        headLog.close()
        for log in frozenLogs { log.close() }
        prepared?.log.close()
    }

    private static func open(id: LayerID, files: LayerFiles, size: UInt64, writable: Bool, logger: Logger) throws -> Layer {
        let data = try FileDevice(path: files.dataPath, readOnly: !writable, logger: logger)
        guard data.size == size else {
            throw OpenError(description: "layer file \(files.dataPath) holds \(data.size) bytes, not the volume's \(size)")
        }
        return Layer(id: id, data: data)
    }

    private static func openLog(_ path: String) throws -> FileDescriptor {
        let fd = Glibc.open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.current("open \(path)") }
        return FileDescriptor(rawValue: fd)
    }

    public var head: Layer { layers[layers.count - 1] }

    /// Where blocks no layer records are read from: its map records only zeroes.
    public var bottom: Layer { layers[0] }

    /// Layers are in ascending id order (each new head takes the next id):
    /// a binary search, so a chain of 1000 costs a read ten comparisons.
    func layer(_ id: LayerID) -> Layer {
        if head.id == id { return head }
        var low = 0, high = layers.count
        while low < high {
            let middle = (low + high) / 2
            if layers[middle].id < id { low = middle + 1 } else { high = middle }
        }
        precondition(low < layers.count && layers[low].id == id, "layer \(id) is not in the chain")
        return layers[low]
    }

    /// Where the next record of the head's log goes: each record has its own
    /// place, so threads append without a lock (replay skips none: an append
    /// not yet written is an unacknowledged write's, and reads as torn).
    func nextLogOffset(records: Int) -> UInt64 {
        UInt64(logEnd.add(Int64(records * MapRecord.size), ordering: .relaxed).oldValue)
    }

    /// Each layer's data file, for the control plane (under the lock a change of head takes).
    public func dataDescriptors() -> [LayerID: FileDescriptor] {
        control.withLock { _ in Dictionary(uniqueKeysWithValues: layers.map { ($0.id, $0.data.descriptor) }) }
    }

    /// Head data and map log on stable storage, and what freezes left unsynced.
    public func flush() throws {
        try control.withLock { _ in
            try head.data.flush()
            try headLog.fdatasync()
            for file in filesToSyncBesidesTheHead { try file.fdatasync() }
        }
    }

    /// Opens a future head's files (from `ReplicaStore.makeHeadFiles`), so
    /// that `switchToPrepared` opens nothing; replaces one prepared before.
    public func prepare(newHead id: LayerID, files: LayerFiles) throws {
        let layer = try Self.open(id: id, files: files, size: size, writable: true, logger: logger)
        let log = try Self.openLog(files.mapPath)
        let replaced = control.withLock { _ in
            defer { prepared = (layer, log) }
            return prepared
        }
        replaced?.log.close()
    }

    /// Freezes the head; the prepared one becomes the head on it. Call only
    /// while no request is in the data path. One synced 16-byte write (the
    /// switch marker, in a block `prefillMapLog` wrote) is all that reaches
    /// the disk here: it is what says, after a crash, that the switch happened
    /// (`ReplicaStore.settlePendingFreeze`). The old head's data and map log
    /// join `unsynced`, which every FLUSH syncs too until `seal` has synced
    /// them, so a FLUSH still covers every write answered before it.
    /// Returns the frozen layer's files, for `seal`.
    public func switchToPrepared() throws -> [FileDescriptor] {
        let frozen: [FileDescriptor] = try control.withLock { _ in
            guard let next = prepared else { preconditionFailure("no head was prepared") }
            var marker = [UInt8](repeating: 0, count: MapRecord.size)
            marker.withUnsafeMutableBytes { LayerFiles.switchMarker.encode(into: $0) }
            let written = marker.withUnsafeBytes { pwrite(next.log.rawValue, $0.baseAddress, $0.count, 0) }
            guard written == marker.count else { throw SystemError.current("write the switch marker") }
            try next.log.fdatasync()
            prepared = nil
            let old = [head.data.descriptor, headLog]
            frozenLogs.append(headLog)
            unsynced.withLock { $0 += old }
            headLog = next.log
            logEnd.store(Int64(MapRecord.size), ordering: .relaxed)
            layers.append(next.layer)
            index.withLock { $0.freezeHead(newHead: next.layer.id) }
            return old
        }
        return frozen
    }

    /// Syncs a frozen layer's files (as `switchToPrepared` returned them);
    /// whether they are on stable storage. A failed sync leaves them in
    /// `unsynced`: the next FLUSH syncs them and answers its error.
    public func seal(_ frozen: [FileDescriptor]) -> Bool {
        guard frozen.allSatisfy({ (try? $0.fdatasync()) != nil }) else { return false }
        unsynced.withLock { list in list.removeAll { fd in frozen.contains { $0.rawValue == fd.rawValue } } }
        return true
    }

    /// Appends records to the head's map log (a merge's takeover), each in
    /// its own place as the I/O threads' are; call while the data path is held.
    func appendHeadRecords(_ records: [MapRecord]) throws {
        guard !records.isEmpty else { return }
        var bytes = [UInt8](repeating: 0, count: records.count * MapRecord.size)
        bytes.withUnsafeMutableBytes { buffer in
            for (i, record) in records.enumerated() {
                record.encode(into: UnsafeMutableRawBufferPointer(rebasing: buffer[i * MapRecord.size..<(i + 1) * MapRecord.size]))
            }
        }
        let offset = nextLogOffset(records: records.count)
        let written = bytes.withUnsafeBytes { pwrite(headLog.rawValue, $0.baseAddress, $0.count, off_t(offset)) }
        guard written == bytes.count else { throw SystemError.current("append to the head's map log") }
    }

    /// A merged snapshot's layer leaves the chain: its child records
    /// `takeover` (already in the child's files). Call only while no request
    /// is in the data path; the layer's file is closed after.
    func removeLayer(_ id: LayerID, takeover: [ExtentMap<BlockContent>.Extent]) {
        let removed: Layer? = control.withLock { _ in
            guard let k = layers.firstIndex(where: { $0.id == id }), k < layers.count - 1 else {
                preconditionFailure("layer \(id) is not a frozen layer of the chain")
            }
            index.withLock { $0.remove(id, takeover: takeover) }
            let gone = layers.remove(at: k)
            forgetUnsynced([gone])
            return gone
        }
        withExtendedLifetime(removed) {}
    }

    /// Every layer newer than `id` goes, the head too; the prepared head
    /// (`prepare`) starts empty on `id`. Call only while no request is in the
    /// data path; the discarded layers' files are closed after.
    func revert(to id: LayerID) {
        let discarded: [Layer] = control.withLock { _ in
            guard let next = prepared else { preconditionFailure("no head was prepared") }
            guard let k = layers.firstIndex(where: { $0.id == id }), k < layers.count - 1 else {
                preconditionFailure("layer \(id) is not a frozen layer of the chain")
            }
            prepared = nil
            let gone = Array(layers[(k + 1)...])
            frozenLogs.append(headLog)
            headLog = next.log
            logEnd.store(0, ordering: .relaxed)
            layers.removeSubrange((k + 1)...)
            layers.append(next.layer)
            index.withLock { $0.revert(to: id, newHead: next.layer.id) }
            forgetUnsynced(gone)
            return gone
        }
        withExtendedLifetime(discarded) {}
    }

    /// Layers leaving the chain: their data need no sync, and their files
    /// close after this (a FLUSH must not sync a number reused by another file).
    private func forgetUnsynced(_ gone: [Layer]) {
        let descriptors = Set(gone.map(\.data.descriptor.rawValue))
        unsynced.withLock { list in list.removeAll { descriptors.contains($0.rawValue) } }
    }

    /// Frozen layers' files that may hold data not yet on stable storage.
    public var filesToSyncBesidesTheHead: [FileDescriptor] { unsynced.withLock { $0 } }
}
