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
public struct LayerFiles: Equatable, Sendable {
    public static let blockSize: UInt64 = 4096

    public let dataPath: String
    public let mapPath: String

    public init(dataPath: String, mapPath: String) {
        self.dataPath = dataPath
        self.mapPath = mapPath
    }

    /// A new layer's files in `directory`: `<id>.img` and `<id>.map`.
    public init(directory: String, id: LayerID) {
        self.init(dataPath: "\(directory)/\(id).img", mapPath: "\(directory)/\(id).map")
    }

    /// Creates both files, empty, and syncs them and their directory: the
    /// layer exists on disk before anything refers to it. Refuses files that exist.
    public static func create(dataPath: String, mapPath: String, size: UInt64) throws -> LayerFiles {
        let layer = LayerFiles(dataPath: dataPath, mapPath: mapPath)
        for (path, length) in [(dataPath, size), (mapPath, 0 as UInt64)] {
            let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw SystemError.current("create \(path)") }
            defer { close(fd) }
            try retryingOnInterrupt("truncate \(path)") { ftruncate(fd, off_t(length)) }
            try retryingOnInterrupt("fsync \(path)") { fsync(fd) }
        }
        try syncDirectory(directoryOf(dataPath))
        return layer
    }

    public static func create(in directory: String, id: LayerID, size: UInt64) throws -> LayerFiles {
        let layer = LayerFiles(directory: directory, id: id)
        return try create(dataPath: layer.dataPath, mapPath: layer.mapPath, size: size)
    }

    /// The layer's map from its log. A torn tail (appends a crash cut, never
    /// acknowledged) is cut off, so that appends go on after the last good record.
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
        let (map, slots) = log.withUnsafeBytes { MapRecord.replay($0) }
        let valid = slots * MapRecord.size
        if valid < log.count {
            try retryingOnInterrupt("truncate \(mapPath)") { ftruncate(fd, off_t(valid)) }
            try retryingOnInterrupt("fsync \(mapPath)") { fsync(fd) }
        }
        return map
    }

    /// The record that says a prepared head became the head (`switchMarker`):
    /// a hole over no block, which replay applies as nothing.
    public static let switchMarker = MapRecord(start: 0, count: 0, content: nil)

    /// The map log's first block written with zeroes and synced, so that the
    /// switch marker later lands in an allocated, written block: its synced
    /// write then needs no file system journal commit (which, under heavy
    /// writes, took hundreds of milliseconds).
    public func prefillMapLog() throws {
        let fd = open(mapPath, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.current("open \(mapPath)") }
        defer { close(fd) }
        let zeroes = [UInt8](repeating: 0, count: Int(Self.blockSize))
        let written = zeroes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        guard written == zeroes.count else { throw SystemError.current("write \(mapPath)") }
        try retryingOnInterrupt("fsync \(mapPath)") { fsync(fd) }
    }

    /// Whether the map log starts with a valid record: the head was switched to
    /// (`switchMarker` first, then the records of writes).
    public func startsWithARecord() throws -> Bool {
        let fd = open(mapPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.current("open \(mapPath)") }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: MapRecord.size)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        return n == MapRecord.size && bytes.withUnsafeBytes { MapRecord(decoding: $0) } != nil
    }

    /// Both files go (a removed or discarded layer), then the directory is synced.
    public func remove() throws {
        for path in [dataPath, mapPath] where unlink(path) != 0 && errno != ENOENT {
            throw SystemError.current("unlink \(path)")
        }
        try syncDirectory(directoryOf(dataPath))
    }
}

private func directoryOf(_ path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return slash == path.startIndex ? "/" : String(path[..<slash])
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

private func syncDirectory(_ path: String) throws {
    let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { throw SystemError.current("open \(path)") }
    defer { close(fd) }
    try retryingOnInterrupt("fsync \(path)") { fsync(fd) }
}
