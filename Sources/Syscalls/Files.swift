#if canImport(Glibc)
import Glibc
#endif

/// `mkdir -p`: creates `path` and any missing parents.
public func makeDirectories(_ path: String, mode: mode_t = 0o755) throws {
    var partial = path.hasPrefix("/") ? "" : "."
    for component in path.split(separator: "/") {
        partial += "/" + component
        if mkdir(partial, mode) != 0 && errno != EEXIST { throw SystemError.current("mkdir \(partial)") }
    }
}

/// A small text file's contents (pid files, /proc, sysfs), nil if it cannot be read.
public func readSmallFile(_ path: String, limit: Int = 1 << 20) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while bytes.count < limit {
        let n = read(fd, &chunk, chunk.count)
        if n > 0 { bytes += chunk[0..<n] } else if n < 0 && errno == EINTR { continue } else { break }
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// The last `bytes` of a file (a log), nil if it cannot be read.
public func readFileTail(_ path: String, bytes: Int) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    let end = lseek(fd, 0, SEEK_END)
    guard end >= 0, lseek(fd, max(0, end - off_t(bytes)), SEEK_SET) >= 0 else { return nil }
    var buffer = [UInt8](repeating: 0, count: bytes)
    var filled = 0
    while filled < bytes {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + filled, bytes - filled) }
        if n > 0 { filled += n } else if n < 0 && errno == EINTR { continue } else { break }
    }
    return String(decoding: buffer.prefix(filled), as: UTF8.self)
}

/// Writes `contents` to an existing file as is (sysfs and /proc files take no rename).
public func writeFileInPlace(_ path: String, _ contents: String) throws {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SystemError.current("open \(path)") }
    defer { close(fd) }
    guard write(fd, contents, contents.utf8.count) == contents.utf8.count else { throw SystemError.current("write \(path)") }
}

/// Replaces `path` with `contents`: written to a temporary file of `mode`, synced, renamed over it.
public func writeFileAtomically(_ path: String, _ contents: String, mode: mode_t = 0o644) throws {
    let temporary = path + ".tmp"
    let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
    guard fd >= 0 else { throw SystemError.current("open \(temporary)") }
    guard fchmod(fd, mode) == 0 else {  // a leftover temporary file keeps its own mode otherwise
        let error = SystemError.current("chmod \(temporary)")
        close(fd)
        unlink(temporary)
        throw error
    }
    let written = write(fd, contents, contents.utf8.count)
    let synced = fsync(fd)
    close(fd)
    guard written == contents.utf8.count, synced == 0 else {
        let error = SystemError.current("write \(temporary)")
        unlink(temporary)
        throw error
    }
    guard rename(temporary, path) == 0 else {
        let error = SystemError.current("rename \(temporary)")
        unlink(temporary)
        throw error
    }
}
