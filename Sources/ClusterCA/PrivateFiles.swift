import Foundation
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Files that must appear together, some of them secret: written into a
/// hidden directory beside the target, synced, then renamed into place.
enum PrivateFiles {
    static func writeTogether(into directory: String, _ files: [(name: String, contents: String, secret: Bool)]) throws {
        let target = URL(fileURLWithPath: directory).standardizedFileURL
        let parent = target.deletingLastPathComponent().path
        try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        let staging = parent + "/." + target.lastPathComponent + ".partial-\(getpid())"
        guard mkdir(staging, 0o700) == 0 else { throw failure("cannot create \(staging)") }
        var done = false
        defer { if !done { try? FileManager.default.removeItem(atPath: staging) } }
        for file in files {
            let path = staging + "/" + file.name
            let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, file.secret ? 0o600 : 0o644)
            guard fd >= 0 else { throw failure("cannot create \(path)") }
            let descriptor = FileDescriptor(rawValue: fd)
            defer { descriptor.close() }
            do {
                try descriptor.writeAll(Array(file.contents.utf8))
                try retryingOnInterrupt("fsync") { fsync(fd) }
            } catch { throw ClusterCA.Failure(description: "cannot write \(path): \(error)") }
        }
        guard rename(staging, target.path) == 0 else {
            if errno == ENOTEMPTY || errno == EEXIST {
                throw ClusterCA.Failure(description: "\(target.path) already exists and is not empty; choose another directory or remove it")
            }
            throw failure("cannot move the files into \(target.path)")
        }
        done = true
        let fd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd >= 0 { _ = fsync(fd); close(fd) }
    }

    private static func failure(_ what: String) -> ClusterCA.Failure {
        ClusterCA.Failure(description: "\(what): \(String(cString: strerror(errno)))")
    }
}
