#if canImport(Glibc)
import Glibc
#endif

/// Page-aligned memory from mmap: usable for O_DIRECT and for io_uring
/// registered buffers, never moved, freed explicitly.
public struct AlignedMemory: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let count: Int

    public static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    public init(count: Int) throws {
        precondition(count > 0)
        let rounded = (count + Self.pageSize - 1) / Self.pageSize * Self.pageSize
        let p = mmap(nil, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let p, p != MAP_FAILED else { throw SystemError.current("mmap \(rounded) bytes") }
        base = p
        self.count = rounded
    }

    /// Takes back memory handed out earlier as `base` and `count`.
    public init(adopting base: UnsafeMutableRawPointer, count: Int) {
        self.base = base
        self.count = count
    }

    public var buffer: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base, count: count)
    }

    public func free() {
        munmap(base, count)
    }
}
