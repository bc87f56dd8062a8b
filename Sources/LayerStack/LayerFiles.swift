import CSyscalls
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A layer on disk, in the replica's `layers/` directory:
///
///     <id>.img   its data: a sparse file of the volume's size, each block at its volume offset
///     <id>.map   its map log (`MapRecord`s): which blocks the layer records, as data or zero
///
/// A block the map does not record is read from the parent layer, whatever
/// the data file holds there.
public struct LayerFiles: Sendable {
    public static let blockSize: UInt64 = 4096

    public let directory: String
    public let id: LayerID

    public init(directory: String, id: LayerID) {
        self.directory = directory
        self.id = id
    }

    public var dataPath: String { "\(directory)/\(id).img" }
    public var mapPath: String { "\(directory)/\(id).map" }

    /// Creates both files, empty, and syncs them and the directory: the layer
    /// exists on disk before anything refers to it. Refuses files that exist.
    public static func create(in directory: String, id: LayerID, size: UInt64) throws -> LayerFiles {
        let layer = LayerFiles(directory: directory, id: id)
        for (path, length) in [(layer.dataPath, size), (layer.mapPath, 0 as UInt64)] {
            let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw SystemError.current("create \(path)") }
            defer { close(fd) }
            try retryingOnInterrupt("truncate \(path)") { ftruncate(fd, off_t(length)) }
            try retryingOnInterrupt("fsync \(path)") { fsync(fd) }
        }
        try syncDirectory(directory)
        return layer
    }

    /// The layer's map from its log. A torn tail (a crash during an append
    /// never acknowledged) is cut off, so that appends go on after the last good record.
    public func loadMap() throws -> ExtentMap<BlockContent> {
        let fd = open(mapPath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.current("open \(mapPath)") }
        defer { close(fd) }
        var log: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = try chunk.withUnsafeMutableBytes { buffer in
                try retryingOnInterrupt("read \(mapPath)") { read(fd, buffer.baseAddress, buffer.count) }
            }
            if n == 0 { break }
            log += chunk[0..<n]
        }
        let (map, records) = log.withUnsafeBytes { MapRecord.replay($0) }
        let valid = records * MapRecord.size
        if valid < log.count {
            try retryingOnInterrupt("truncate \(mapPath)") { ftruncate(fd, off_t(valid)) }
            try retryingOnInterrupt("fsync \(mapPath)") { fsync(fd) }
        }
        return map
    }

    /// Both files go (a removed or discarded layer), then the directory is synced.
    public func remove() throws {
        for path in [dataPath, mapPath] where unlink(path) != 0 && errno != ENOENT {
            throw SystemError.current("unlink \(path)")
        }
        try syncDirectory(directory)
    }
}

/// Appends records to a layer's map log, blocking (the control plane's
/// writes: a snapshot's takeover runs, an upgrade's first map).
public final class MapLog {
    public let path: String
    private let fd: Int32
    private var end: off_t

    public init(path: String) throws {
        fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.current("open \(path)") }
        self.path = path
        end = lseek(fd, 0, SEEK_END)
    }

    deinit { close(fd) }

    public func append(_ records: [MapRecord]) throws {
        guard !records.isEmpty else { return }
        var bytes = [UInt8](repeating: 0, count: records.count * MapRecord.size)
        bytes.withUnsafeMutableBytes { buffer in
            for (i, record) in records.enumerated() {
                record.encode(into: UnsafeMutableRawBufferPointer(rebasing: buffer[i * MapRecord.size..<(i + 1) * MapRecord.size]))
            }
        }
        var done = 0
        while done < bytes.count {
            let n = try bytes.withUnsafeBytes { buffer in
                try retryingOnInterrupt("write \(path)") {
                    pwrite(fd, buffer.baseAddress! + done, buffer.count - done, end + off_t(done))
                }
            }
            done += n
        }
        end += off_t(done)
    }

    public func sync() throws {
        try retryingOnInterrupt("fdatasync \(path)") { fdatasync(fd) }
    }
}

/// The allocated runs of a file in blocks (SEEK_DATA and SEEK_HOLE): the map
/// of a head layer written before layers had maps, found once, at the upgrade.
public func allocatedBlocks(path: String, blockSize: UInt64 = LayerFiles.blockSize) throws -> [Range<UInt64>] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SystemError.current("open \(path)") }
    defer { close(fd) }
    let size = lseek(fd, 0, SEEK_END)
    guard size >= 0 else { throw SystemError.current("seek \(path)") }
    var runs: [Range<UInt64>] = []
    var position: off_t = 0
    while position < size {
        let data = lseek(fd, position, keel_seek_data)
        if data < 0 {
            if errno == ENXIO { break }
            throw SystemError.current("seek data in \(path)")
        }
        var hole = lseek(fd, data, keel_seek_hole)
        if hole < 0 { hole = size }
        // Partly written blocks count whole.
        let run = UInt64(data) / blockSize..<(UInt64(hole) + blockSize - 1) / blockSize
        if let last = runs.last, last.upperBound >= run.lowerBound {
            runs[runs.count - 1] = last.lowerBound..<max(last.upperBound, run.upperBound)
        } else {
            runs.append(run)
        }
        position = hole
    }
    return runs
}

private func syncDirectory(_ path: String) throws {
    let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { throw SystemError.current("open \(path)") }
    defer { close(fd) }
    try retryingOnInterrupt("fsync \(path)") { fsync(fd) }
}
