import CSyscalls
import IOUring
import Logging
import NBDServer
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A raw image file (or block device) served as an NBD export.
///
/// I/O is O_DIRECT when the filesystem allows it and the size is a multiple
/// of `directAlignment`; otherwise buffered, with fdatasync where the
/// protocol promises durability (tmpfs before Linux 6.6, 9p, odd sizes).
public final class FileDevice: BlockDevice {
    public static let directAlignment = 4096

    public let path: String
    public let descriptor: FileDescriptor
    public let size: UInt64
    public let readOnly: Bool
    public let alignment: Int
    public var isDirect: Bool { alignment > 1 }
    let edgeLocks = EdgeLocks()

    public struct OpenError: Error, CustomStringConvertible {
        public let description: String
    }

    public init(path: String, readOnly: Bool, logger: Logger) throws {
        self.path = path
        self.readOnly = readOnly
        let access = readOnly ? O_RDONLY : O_RDWR
        var fd = Glibc.open(path, access | O_CLOEXEC | keel_o_direct)
        var direct = fd >= 0
        if fd < 0 && errno == EINVAL {
            fd = Glibc.open(path, access | O_CLOEXEC)
        }
        guard fd >= 0 else {
            throw OpenError(description: "cannot open \(path): \(String(cString: strerror(errno)))")
        }
        var descriptor = FileDescriptor(rawValue: fd)
        let status: FileDescriptor.Status
        do { status = try descriptor.status() } catch { descriptor.close(); throw error }
        guard status.isRegularFile || status.isBlockDevice else {
            descriptor.close()
            throw OpenError(description: "\(path) is neither a regular file nor a block device")
        }
        if direct && status.size % UInt64(Self.directAlignment) != 0 {
            descriptor.close()
            descriptor = FileDescriptor(rawValue: Glibc.open(path, access | O_CLOEXEC))
            direct = false
            logger.notice("\(path): size is not a multiple of \(Self.directAlignment); using buffered I/O")
        } else if !direct {
            logger.notice("\(path): the filesystem refuses O_DIRECT; using buffered I/O with fdatasync")
        }
        self.descriptor = descriptor
        size = status.size
        alignment = direct ? Self.directAlignment : 1
    }

    deinit { descriptor.close() }

    public func makeWorker(ring: Ring, arena: BufferArena) throws -> FileWorker {
        FileWorker(device: self, ring: ring, arena: arena)
    }

    public func flush() throws {
        guard !readOnly else { return }
        try descriptor.fdatasync()
    }
}
