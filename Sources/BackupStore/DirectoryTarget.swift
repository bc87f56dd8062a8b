import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A backup store in a local directory or an NFS mount. Every object is written under a
/// temporary name, synced and renamed into place; `makeDurable` syncs the directories
/// renamed into since the last call, so that what a manifest names is on disk before it.
public final class DirectoryTarget: BackupTarget, @unchecked Sendable {
    public let url: String
    let root: String
    private let lock = NSLock()
    private var unsyncedDirectories: Set<String> = []

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
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw systemError("read \(key)")
            }
            if count == 0 { return bytes }
            bytes.append(contentsOf: chunk[..<count])
        }
    }

    public func exists(_ key: String) throws -> Bool {
        access(path(key), F_OK) == 0
    }

    public func put(_ key: String, _ bytes: [UInt8]) throws {
        let temporary = try writeTemporary(key, bytes)
        guard rename(temporary, path(key)) == 0 else {
            let error = systemError("store \(key)")
            unlink(temporary)
            throw error
        }
        noteRenamedInto(key)
    }

    public func putIfAbsent(_ key: String, _ bytes: [UInt8]) throws -> Bool {
        let temporary = try writeTemporary(key, bytes)
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

    private func writeTemporary(_ key: String, _ bytes: [UInt8]) throws -> String {
        let directory = directory(of: key)
        try createDirectories(directory)
        let temporary = directory + "/.tmp-\(UInt64.random(in: 0 ... .max))"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw systemError("create a file in \(directory)") }
        var done = 0
        let result: Int32 = bytes.withUnsafeBytes { buffer in
            while done < buffer.count {
                let count = write(fd, buffer.baseAddress! + done, buffer.count - done)
                if count < 0 {
                    if errno == EINTR { continue }
                    return -1
                }
                done += count
            }
            return fsync(fd)
        }
        let failure = result == 0 ? nil : systemError("write \(key)")
        close(fd)
        if let failure {
            unlink(temporary)
            throw failure
        }
        return temporary
    }

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
