import CLiburing
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A provided-buffer ring: the kernel picks a free buffer for each receive,
/// so idle connections hold no memory. liburing 2.3 has no
/// `io_uring_setup_buf_ring`, so the ring memory is mapped and registered here.
public final class ProvidedBuffers {
    public let groupID: UInt16
    public let count: Int
    public let bufferSize: Int
    private let ringMemory: AlignedMemory
    private let bufferMemory: AlignedMemory
    private let bufferRing: UnsafeMutablePointer<io_uring_buf_ring>
    private let mask: Int32
    private var pendingAdvance: Int32 = 0

    /// `count` must be a power of two.
    public init(ring: Ring, groupID: UInt16, count: Int, bufferSize: Int) throws {
        precondition(count > 0 && count & (count - 1) == 0 && count <= 32768)
        self.groupID = groupID
        self.count = count
        self.bufferSize = bufferSize
        ringMemory = try AlignedMemory(count: count * MemoryLayout<io_uring_buf>.stride)
        bufferMemory = try AlignedMemory(count: count * bufferSize)
        bufferRing = ringMemory.base.bindMemory(to: io_uring_buf_ring.self, capacity: 1)
        mask = io_uring_buf_ring_mask(UInt32(count))
        io_uring_buf_ring_init(bufferRing)

        var reg = io_uring_buf_reg()
        reg.ring_addr = UInt64(UInt(bitPattern: ringMemory.base))
        reg.ring_entries = UInt32(count)
        reg.bgid = groupID
        do { try ring.registerBufferRing(&reg) } catch {
            ringMemory.free(); bufferMemory.free(); throw error
        }
        for id in 0..<count { recycle(UInt16(id)) }
        publish()
    }

    deinit {
        ringMemory.free()
        bufferMemory.free()
    }

    @inlinable
    public func bytes(of id: UInt16, count length: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: base(of: id), count: length)
    }

    @usableFromInline
    func base(of id: UInt16) -> UnsafeMutableRawPointer {
        bufferMemory.base + Int(id) * bufferSize
    }

    /// Gives a buffer back to the kernel; visible after `publish()`.
    public func recycle(_ id: UInt16) {
        io_uring_buf_ring_add(bufferRing, base(of: id), UInt32(bufferSize), id, mask, pendingAdvance)
        pendingAdvance += 1
    }

    /// Makes all recycled buffers visible to the kernel at once.
    public func publish() {
        guard pendingAdvance > 0 else { return }
        io_uring_buf_ring_advance(bufferRing, pendingAdvance)
        pendingAdvance = 0
    }
}
