import Syscalls

/// Page-aligned I/O buffers for one thread, registered with its ring as fixed
/// buffer 0. Sizes are rounded up to a power of two between `minimumChunk`
/// and `largestClass`; each class keeps a free list, so a steady workload
/// allocates nothing. Larger requests, or an exhausted arena, get a
/// separately mapped buffer that is not registered (`isFixed == false`).
public final class BufferArena {
    public struct Buffer {
        public let base: UnsafeMutableRawPointer
        public let capacity: Int
        /// Registered with the ring: use READ_FIXED / WRITE_FIXED.
        public let isFixed: Bool
        @usableFromInline let sizeClass: Int8   // -1: mapped separately
    }

    public static let minimumChunk = 4096
    public static let largestClass = 1 << 20

    private let memory: AlignedMemory
    private var bumpOffset = 0
    private var freeLists: [[Int]]
    private let classCount: Int

    public init(ring: Ring, bytes: Int) throws {
        memory = try AlignedMemory(count: bytes)
        classCount = (Self.largestClass / Self.minimumChunk).trailingZeroBitCount + 1
        freeLists = Array(repeating: [], count: classCount)
        for i in 0..<classCount { freeLists[i].reserveCapacity(bytes / (Self.minimumChunk << i)) }
        do { try ring.registerBuffer(memory.buffer) } catch { memory.free(); throw error }
    }

    deinit { memory.free() }

    public func allocate(_ count: Int) -> Buffer? {
        guard count <= Self.largestClass else { return allocateSeparately(count) }
        let sizeClass = classIndex(for: count)
        let size = Self.minimumChunk << sizeClass
        if let offset = freeLists[sizeClass].popLast() {
            return Buffer(base: memory.base + offset, capacity: size, isFixed: true, sizeClass: Int8(sizeClass))
        }
        if bumpOffset + size <= memory.count {
            defer { bumpOffset += size }
            return Buffer(base: memory.base + bumpOffset, capacity: size, isFixed: true, sizeClass: Int8(sizeClass))
        }
        return allocateSeparately(count)
    }

    public func release(_ buffer: Buffer) {
        if buffer.sizeClass < 0 {
            AlignedMemory(adopting: buffer.base, count: buffer.capacity).free()
        } else {
            freeLists[Int(buffer.sizeClass)].append(buffer.base - memory.base)
        }
    }

    private func classIndex(for count: Int) -> Int {
        let chunks = max(1, (count + Self.minimumChunk - 1) / Self.minimumChunk)
        return Int.bitWidth - (chunks - 1).leadingZeroBitCount
    }

    private func allocateSeparately(_ count: Int) -> Buffer? {
        guard let mapped = try? AlignedMemory(count: count) else { return nil }
        return Buffer(base: mapped.base, capacity: mapped.count, isFixed: false, sizeClass: -1)
    }
}
