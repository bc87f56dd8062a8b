import CSyscalls
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A backup store in a local directory or an NFS mount. Every object is written under a
/// temporary name, synced and renamed into place; `makeDurable` syncs the directories
/// renamed into since the last call, so that what a manifest names is on disk before it.
/// Deferred puts (a backup's blocks) are written unsynced and, a batch at a time, made durable
/// by one `syncfs` and only then renamed into place: one cache flush for many blocks.
public final class DirectoryTarget: BackupTarget, @unchecked Sendable {
    public let url: String
    let root: String
    private let lock = NSLock()
    private var unsyncedDirectories: Set<String> = []
    private var deferred: [(temporary: String, key: String)] = []
    /// The file system refused O_DIRECT once (tmpfs): not asked again.
    private var directRefused = false
    /// 64 blocks of 2 MiB: the dirty data one syncfs flushes.
    static let deferredBatch = 64

    init(url: String, path: String) throws {
        self.url = url
        root = path.hasSuffix("/") ? String(path.dropLast()) : path
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: root, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw BackupTargetError("\(url): no such directory; create it first (mkdir -p \(root))")
        }
        guard access(root, W_OK) == 0 else { throw BackupTargetError("\(url): the directory is not writable") }
    }

    func path(_ key: String) -> String {
        precondition(!key.contains("..") && !key.hasPrefix("/"), "a store key stays inside the store: \(key)")
        return root + "/" + key
    }

    public func get(_ key: String) throws -> [UInt8]? {
        let fd = open(path(key), O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { return nil }
            throw systemError("read \(key)")
        }
        defer { close(fd) }
        var status = stat()
        guard fstat(fd, &status) == 0 else { throw systemError("read \(key)") }
        // Objects are written whole and never change: one read of the size fstat gives.
        let size = Int(status.st_size)
        var failed = false
        let bytes = [UInt8](unsafeUninitializedCapacity: size) { buffer, count in
            count = 0
            while count < size {
                let got = pread(fd, buffer.baseAddress! + count, size - count, off_t(count))
                if got < 0 && errno == EINTR { continue }
                guard got > 0 else { failed = got < 0; break }
                count += got
            }
        }
        if failed { throw systemError("read \(key)") }
        guard bytes.count == size else { throw BackupTargetError("\(url): \(key) ended after \(bytes.count) of its \(size) bytes") }
        return bytes
    }

    public func exists(_ key: String) throws -> Bool {
        access(path(key), F_OK) == 0
    }

    public func put(_ key: String, _ bytes: [UInt8]) throws {
        let temporary = try bytes.withUnsafeBytes { try writeTemporary(key, $0) }
        guard rename(temporary, path(key)) == 0 else {
            let error = systemError("store \(key)")
            unlink(temporary)
            throw error
        }
        noteRenamedInto(key)
    }

    public func putDeferred(_ key: String, _ bytes: UnsafeRawBufferPointer) throws {
        let temporary = try writeTemporary(key, bytes, sync: false, direct: true)
        let full = lock.withLock {
            deferred.append((temporary, key))
            return deferred.count >= Self.deferredBatch
        }
        if full { try publishDeferred() }
    }

    /// One syncfs for the batch, then the renames: a block is never visible before it is durable.
    private func publishDeferred() throws {
        let batch = lock.withLock {
            defer { deferred = [] }
            return deferred
        }
        guard !batch.isEmpty else { return }
        let fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw systemError("open \(root)") }
        let synced = keel_syncfs(fd)
        close(fd)
        guard synced == 0 else {
            let error = systemError("sync \(root)")
            batch.forEach { unlink($0.temporary) }
            throw error
        }
        for (index, (temporary, key)) in batch.enumerated() {
            guard rename(temporary, path(key)) == 0 else {
                let error = systemError("store \(key)")
                batch[index...].forEach { unlink($0.temporary) }
                throw error
            }
            noteRenamedInto(key)
        }
    }

    public func putIfAbsent(_ key: String, _ bytes: [UInt8]) throws -> Bool {
        let temporary = try bytes.withUnsafeBytes { try writeTemporary(key, $0) }
        defer { unlink(temporary) }
        // link(2) fails with EEXIST when the name is taken: atomic on local file systems and NFS.
        guard link(temporary, path(key)) == 0 else {
            if errno == EEXIST { return false }
            throw systemError("store \(key)")
        }
        noteRenamedInto(key)
        try makeDurable()
        return true
    }

    public func list(_ prefix: String) throws -> [(key: String, size: Int)] {
        let slash = prefix.lastIndex(of: "/").map { prefix[...$0] } ?? ""
        let base = root + "/" + slash
        guard let walker = FileManager.default.enumerator(atPath: base) else { return [] }
        var found: [(key: String, size: Int)] = []
        while let relative = walker.nextObject() as? String {
            let key = String(slash) + relative
            guard key.hasPrefix(prefix), !(relative.split(separator: "/").last?.hasPrefix(".tmp-") ?? false) else { continue }
            var status = stat()
            guard stat(root + "/" + key, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else { continue }
            found.append((key, Int(status.st_size)))
        }
        return found.sorted { $0.key < $1.key }
    }

    public func delete(_ keys: [String]) throws {
        for key in keys where unlink(path(key)) != 0 && errno != ENOENT {
            throw systemError("remove \(key)")
        }
        if !keys.isEmpty {
            lock.withLock { keys.forEach { unsyncedDirectories.insert(directory(of: $0)) } }
        }
    }

    public func makeDurable() throws {
        try publishDeferred()
        let directories = lock.withLock {
            defer { unsyncedDirectories = [] }
            return unsyncedDirectories
        }
        for directory in directories.sorted() {
            let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else { throw systemError("open \(directory)") }
            defer { close(fd) }
            guard fsync(fd) == 0 else { throw systemError("sync \(directory)") }
        }
    }

    /// The temporary files of writers that died between creating and renaming them.
    public func abortStaleUploads(olderThan age: TimeInterval) throws -> Int {
        let cutoff = Date().addingTimeInterval(-age).timeIntervalSince1970
        guard let walker = FileManager.default.enumerator(atPath: root) else { return 0 }
        var removed = 0
        while let relative = walker.nextObject() as? String {
            guard relative.split(separator: "/").last?.hasPrefix(".tmp-") ?? false else { continue }
            var status = stat()
            guard lstat(root + "/" + relative, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG,
                  TimeInterval(status.st_mtim.tv_sec) <= cutoff else { continue }
            if unlink(root + "/" + relative) == 0 {
                removed += 1
            } else if errno != ENOENT {
                throw systemError("remove \(relative)")
            }
        }
        return removed
    }

    /// Writes the object under a temporary name in its directory and returns that name. With `direct`,
    /// through O_DIRECT (but for the last partial page; see `writeDirect`): no copy
    /// into the page cache, whose fresh pages cost dearly here; where the file system refuses
    /// O_DIRECT (tmpfs), through the page cache from then on.
    private func writeTemporary(_ key: String, _ bytes: UnsafeRawBufferPointer, sync: Bool = true, direct: Bool = false) throws -> String {
        let directory = directory(of: key)
        try createDirectories(directory)
        let temporary = directory + "/.tmp-\(UInt64.random(in: 0 ... .max))"
        let flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC
        var direct = direct && lock.withLock { !directRefused }
        var fd = open(temporary, flags | (direct ? keel_o_direct : 0), 0o644)
        if fd < 0 && direct && errno == EINVAL {
            unlink(temporary)  // made before O_DIRECT was refused
            lock.withLock { directRefused = true }
            direct = false
            fd = open(temporary, flags, 0o644)
        }
        guard fd >= 0 else { throw systemError("create a file in \(directory)") }
        let written = (direct ? writeDirect(fd, bytes) : writeAll(fd, bytes)) && (!sync || fsync(fd) == 0)
        let failure = written ? nil : systemError("write \(key)")
        close(fd)
        if let failure {
            unlink(temporary)
            throw failure
        }
        return temporary
    }

    /// Whole pages through O_DIRECT (from the caller's buffer when it is page-aligned, else from a pool's),
    /// the last partial page through the page cache (synced with the rest by the caller): a padded page
    /// cut back by ftruncate cost a quarter of the write's time on ext4.
    private func writeDirect(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
        let page = 4096
        let whole = bytes.count / page * page
        if whole > 0 {
            if Int(bitPattern: bytes.baseAddress) % page == 0 {
                guard writeAll(fd, UnsafeRawBufferPointer(rebasing: bytes[0 ..< whole])) else { return false }
            } else {
                let buffer = alignedBuffers.take(capacity: whole)
                defer { alignedBuffers.give(buffer) }
                buffer.baseAddress!.copyMemory(from: bytes.baseAddress!, byteCount: whole)
                guard writeAll(fd, UnsafeRawBufferPointer(rebasing: buffer[0 ..< whole])) else { return false }
            }
        }
        guard whole < bytes.count else { return true }
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, flags & ~keel_o_direct) == 0 else { return false }
        return writeAll(fd, UnsafeRawBufferPointer(rebasing: bytes[whole...]), at: whole)
    }

    private func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: Int = 0) -> Bool {
        var done = 0
        while done < bytes.count {
            let count = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { return false }
            done += count
        }
        return true
    }

    private let alignedBuffers = AlignedBufferPool()

    private func directory(of key: String) -> String {
        let full = path(key)
        return String(full[..<full.lastIndex(of: "/")!])
    }

    /// mkdir -p, each new directory's entry made durable in its parent at the next `makeDurable`.
    private func createDirectories(_ directory: String) throws {
        guard access(directory, F_OK) != 0 else { return }
        let parent = String(directory[..<directory.lastIndex(of: "/")!])
        try createDirectories(parent)
        guard mkdir(directory, 0o755) == 0 || errno == EEXIST else { throw systemError("create \(directory)") }
        lock.withLock { _ = unsyncedDirectories.insert(parent) }
    }

    private func noteRenamedInto(_ key: String) {
        let directory = directory(of: key)
        lock.withLock { _ = unsyncedDirectories.insert(directory) }
    }

    private func systemError(_ what: String) -> BackupTargetError {
        BackupTargetError("\(url): cannot \(what): \(String(cString: strerror(errno)))")
    }
}

/// Page-aligned buffers for O_DIRECT writes, reused: each is touched once, not once per block.
final class AlignedBufferPool: @unchecked Sendable {
    private let lock = NSLock()
    private var free: [UnsafeMutableRawBufferPointer] = []

    func take(capacity: Int) -> UnsafeMutableRawBufferPointer {
        if let buffer = lock.withLock({ free.firstIndex { $0.count >= capacity }.map { free.remove(at: $0) } }) { return buffer }
        return UnsafeMutableRawBufferPointer.allocate(byteCount: max(capacity, 4 << 20), alignment: 4096)
    }

    func give(_ buffer: UnsafeMutableRawBufferPointer) { lock.withLock { free.append(buffer) } }

    deinit { free.forEach { $0.deallocate() } }
}
