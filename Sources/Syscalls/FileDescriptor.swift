#if canImport(Glibc)
import Glibc
#endif

/// A raw file descriptor. Ownership is explicit: whoever opened it closes it.
public struct FileDescriptor: Hashable, Sendable {
    public let rawValue: Int32

    public init(rawValue: Int32) { self.rawValue = rawValue }

    public func close() {
        _ = Glibc.close(rawValue)
    }
}

extension FileDescriptor {
    /// Whole-file properties that an export needs.
    public struct Status {
        public var size: UInt64
        public var isRegularFile: Bool
        public var isBlockDevice: Bool
    }

    public func status() throws -> Status {
        var st = stat()
        try retryingOnInterrupt("fstat") { fstat(rawValue, &st) }
        let type = st.st_mode & S_IFMT
        var size = UInt64(st.st_size)
        if type == S_IFBLK {
            var bytes: UInt64 = 0
            // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
            if ioctl(rawValue, 0x8008_1272, &bytes) == 0 { size = bytes }
        }
        return Status(size: size, isRegularFile: type == S_IFREG, isBlockDevice: type == S_IFBLK)
    }

    public func fdatasync() throws {
        try retryingOnInterrupt("fdatasync") { Glibc.fdatasync(rawValue) }
    }

    /// Writes all of `bytes`, looping over short writes (blocking descriptors only).
    public func writeAll(_ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            let n = try retryingOnInterrupt("write") {
                Glibc.write(rawValue, bytes.baseAddress! + done, bytes.count - done)
            }
            done += n
        }
    }

    public func writeAll(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try writeAll($0) }
    }

    /// Reads up to `count` bytes; an empty result means end of file.
    public func read(upTo count: Int) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        let n = try buffer.withUnsafeMutableBytes { raw in
            try retryingOnInterrupt("read") { Glibc.read(rawValue, raw.baseAddress, count) }
        }
        buffer.removeSubrange(n...)
        return buffer
    }
}
