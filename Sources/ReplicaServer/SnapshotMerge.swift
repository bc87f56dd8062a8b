import FileExport
import LayerStack
import ReplicaIdentity
import ReplicaStore
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Removing a snapshot: its layer is merged into its child, the next newer
/// layer, while the data path goes on. Every step leaves a chain that reads
/// the same, because the child only gains what it read from the removed layer:
///
/// 1. The takeover: the blocks the removed layer records that the child does
///    not (for the bottom layer, everything the child does not record).
/// 2. Their data is copied into the child's file and synced, then their
///    records appended to the child's map log and synced. A head child is
///    being written meanwhile: each piece is written, and later recorded,
///    with the data path held for it, and only over blocks the head still
///    does not record, so an engine's write always wins.
/// 3. One transaction drops the layer and keeps its name as removed.
/// 4. With the data path held, the chain in memory drops it; its files go.
///
/// A crash before 3 leaves the layer in the chain and the child holding
/// copies of some of its blocks (the same bytes); after 3, leftover files
/// go at the next open.
extension ReplicaDevice {
    /// At most this many blocks are copied or recorded per hold of the data path.
    static let mergePiece: UInt64 = 256

    public func mergeSnapshot(named name: String, owner: Owner?, checkOnly: Bool) throws {
        try chainWork.sync {
            try store.checkOwner(owner)
            guard let snapshot = try store.snapshots().first(where: { $0.name == name }) else {
                if try store.removedSnapshots().contains(name) { return }
                throw ReplicaStore.SnapshotFailure.unknown(name)
            }
            let readers = sessions.connections(epoch: ReplicaSession.snapshot(layer: snapshot.layer).raw)
            guard readers == 0 else { throw ReplicaStore.SnapshotFailure.beingRead(name, connections: readers) }
            if checkOnly { return }
            try merge(snapshot, owner: owner)
        }
    }

    private func merge(_ snapshot: SnapshotRecord, owner: Owner?) throws {
        let records = try store.chain()
        guard let k = records.firstIndex(where: { $0.id == snapshot.layer }), k + 1 < records.count else {
            throw SnapshotError(description: "snapshot \(snapshot.name) is not a frozen layer of this replica's chain")
        }
        let removed = records[k], child = records[k + 1]
        let childIsHead = k + 1 == records.count - 1
        let blocks = size / LayerFiles.blockSize
        // Files of their own, buffered: the chain's may be O_DIRECT.
        let source = open(removed.files.dataPath, O_RDONLY | O_CLOEXEC)
        guard source >= 0 else { throw SystemError.current("open \(removed.files.dataPath)") }
        defer { close(source) }
        let removedFile = FileDescriptor(rawValue: source)
        let takeover: [ExtentMap<BlockContent>.Extent] = chain.index.withLock { index in
            guard k == 0 else { return index.takeover(removing: removed.id) }
            return index.takeoverOfBottom(blocks: blocks) { run in Self.fileContent(removedFile, run) }
        }

        let target = open(child.files.dataPath, O_WRONLY | O_CLOEXEC)
        guard target >= 0 else { throw SystemError.current("open \(child.files.dataPath)") }
        defer { close(target) }
        try copyData(takeover, from: removedFile, to: target, guardedByHead: childIsHead)
        try retryingOnInterrupt("fdatasync \(child.files.dataPath)") { fdatasync(target) }
        if childIsHead {
            try recordInHead(takeover)
            try chain.flush()
        } else {
            let log = try MapLog(path: child.files.mapPath)
            try log.append(takeover.flatMap { MapRecord.records($0.range, $0.value) })
            try log.sync()
        }

        try store.dropSnapshotLayer(snapshot, owner: owner)
        try holdingTheDataPath("merge snapshot \(snapshot.name)") {
            chain.removeLayer(removed.id, takeover: childIsHead ? [] : takeover)
        }
        try removed.files.remove()
    }

    /// Data runs' blocks from the removed layer's file into the child's, a piece at a time.
    private func copyData(_ takeover: [ExtentMap<BlockContent>.Extent], from source: FileDescriptor, to target: Int32,
                          guardedByHead: Bool) throws {
        let b = LayerFiles.blockSize
        var buffer = [UInt8](repeating: 0, count: Int(Self.mergePiece * b))
        for run in takeover where run.value == .data {
            for start in stride(from: run.start, to: run.end, by: Int(Self.mergePiece)) {
                let piece = start..<min(run.end, start + Self.mergePiece)
                let bytes = Int(UInt64(piece.count) * b)
                let read = buffer.withUnsafeMutableBytes { pread(source.rawValue, $0.baseAddress, bytes, off_t(piece.lowerBound * b)) }
                guard read == bytes else { throw SystemError.current("read a merged layer") }
                let write = { (parts: [Range<UInt64>]) throws in
                    for part in parts {
                        let offset = Int((part.lowerBound - piece.lowerBound) * b), length = Int(UInt64(part.count) * b)
                        let written = buffer.withUnsafeBytes { pwrite(target, $0.baseAddress! + offset, length, off_t(part.lowerBound * b)) }
                        guard written == length else { throw SystemError.current("write a merged layer's data") }
                    }
                }
                if guardedByHead {
                    try holdingTheDataPath("copy a merged snapshot's data") { try write(headHoles(in: piece)) }
                } else {
                    try write([piece])
                }
            }
        }
    }

    /// The takeover's records in the head, a piece at a time, where the head still records nothing.
    private func recordInHead(_ takeover: [ExtentMap<BlockContent>.Extent]) throws {
        let piece = Self.mergePiece * 16
        for run in takeover {
            for start in stride(from: run.start, to: run.end, by: Int(piece)) {
                let blocks = start..<min(run.end, start + piece)
                try holdingTheDataPath("record a merged snapshot's blocks") {
                    let holes = headHoles(in: blocks)
                    try chain.appendHeadRecords(holes.flatMap { MapRecord.records($0, run.value) })
                    chain.index.withLock { index in for hole in holes { index.record(run.value, hole) } }
                }
            }
        }
    }

    private func headHoles(in blocks: Range<UInt64>) -> [Range<UInt64>] {
        var holes: [Range<UInt64>] = []
        chain.index.withLock { index in
            index.head.map.forEach(in: blocks) { run, content in if content == nil { holes.append(run) } }
        }
        return holes
    }

    private func holdingTheDataPath(_ what: String, _ body: () throws -> Void) throws {
        guard fence.hold(seconds: 5) else {
            throw SnapshotError(description: "requests in flight did not finish within 5 s; could not \(what)")
        }
        defer { fence.release() }
        try body()
    }

    /// What the bottom layer's file holds over `run` where no record says,
    /// by block: data (a block with any data in it) or zeroes (holes).
    static func fileContent(_ file: FileDescriptor, _ run: Range<UInt64>) -> [(Range<UInt64>, BlockContent)] {
        let b = LayerFiles.blockSize
        var pieces: [(Range<UInt64>, BlockContent)] = []
        var position = run.lowerBound * b
        var covered = run.lowerBound
        while position < run.upperBound * b {
            let allocation = FileAllocation.run(of: file, at: position, before: run.upperBound * b)
            let next = allocation.isData ? (allocation.end + b - 1) / b : allocation.end / b
            if next > covered {
                let content: BlockContent = allocation.isData ? .data : .zero
                if let last = pieces.last, last.1 == content {
                    pieces[pieces.count - 1].0 = last.0.lowerBound..<next
                } else {
                    pieces.append((covered..<next, content))
                }
                covered = next
            }
            position = max(allocation.end, position + 1)
        }
        return pieces
    }
}
