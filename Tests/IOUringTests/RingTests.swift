import Foundation
import IOUring
import Syscalls
import Testing

/// The io_uring layer against real files and sockets.
@Suite struct RingTests {
    /// Waits for exactly `count` completions (bounded), collecting them.
    private func completions(_ ring: Ring, count: Int) throws -> [Completion] {
        var seen: [Completion] = []
        for _ in 0..<1000 where seen.count < count {
            try ring.submitAndWait(1)
            ring.drainCompletions { seen.append($0) }
        }
        return seen
    }

    /// Defect: with the submission queue full and the completion queue
    /// overflowing, the kernel takes no entries (-EBUSY) until completions are
    /// reaped, and `nextSubmission` spun for ever. Entries now wait in a
    /// backlog and reach the ring once the caller reaps.
    @Test func moreSubmissionsThanBothQueuesHoldNeverSpin() throws {
        let ring = try Ring(entries: 4)
        for i in 0..<200 { ring.nop(userData: UInt64(i)) }
        var seen = Set<UInt64>()
        for _ in 0..<1000 where seen.count < 200 {
            try ring.submitAndWait(1)
            ring.drainCompletions { seen.insert($0.userData) }
        }
        #expect(seen == Set(0..<200))
        #expect(ring.backloggedSubmissions == 0)
    }

    /// Kernels before 5.19 refuse submissions (-EBUSY) while completions wait
    /// to be reaped; `nextSubmission` then looped on the submit for ever, since
    /// only its caller reaps. Now the entries wait in the backlog.
    @Test func aKernelThatRefusesSubmissionsUntilReapedNeverMakesNextSubmissionSpin() throws {
        let ring = try Ring(entries: 4)
        ring.refusesSubmitsForRoom = true
        for i in 0..<20 { ring.nop(userData: UInt64(i)) }
        #expect(ring.backloggedSubmissions == 16)
        ring.refusesSubmitsForRoom = false
        var seen = Set<UInt64>()
        for _ in 0..<100 where seen.count < 20 {
            try ring.submitAndWait(1)
            ring.drainCompletions { seen.insert($0.userData) }
        }
        #expect(seen == Set(0..<20))
        #expect(ring.backloggedSubmissions == 0)
    }

    @Test func setupPrefersSingleIssuerDeferTaskrun() throws {
        let ring = try Ring(entries: 8)
        // This machine's kernel (6.x) accepts them; older ones fall back to a plain ring.
        #expect(ring.acceptedPreferredFlags)
    }

    @Test func directWriteAndReadThroughRegisteredBuffers() throws {
        let ring = try Ring(entries: 16)
        let arena = try BufferArena(ring: ring, bytes: 1 << 20)
        let path = "/var/tmp/keel-ring-\(UUID().uuidString.prefix(8))"
        defer { unlink(path) }
        let fd = FileDescriptor(rawValue: open(path, O_RDWR | O_CREAT | 0o40000 /* O_DIRECT */, 0o600))
        #expect(fd.rawValue >= 0)
        defer { fd.close() }
        let out = arena.allocate(8192)!, back = arena.allocate(8192)!
        #expect(out.isFixed && out.capacity == 8192)
        for i in 0..<8192 { out.base.storeBytes(of: UInt8(truncatingIfNeeded: i * 13), toByteOffset: i, as: UInt8.self) }
        ring.write(fd, from: out.base, count: 8192, at: 4096, fixed: true, dataSync: true, userData: 1)
        #expect(try completions(ring, count: 1).map(\.result) == [8192])
        ring.read(fd, into: back.base, count: 8192, at: 4096, fixed: true, userData: 2)
        let read = try completions(ring, count: 1)
        #expect(read.map(\.userData) == [2] && read.map(\.result) == [8192])
        #expect(memcmp(out.base, back.base, 8192) == 0)
        ring.fdatasync(fd, userData: 3)
        #expect(try completions(ring, count: 1).map(\.result) == [0])
    }

    @Test func arenaReusesFreedBuffersAndFallsBackWhenFull() throws {
        let ring = try Ring(entries: 8)
        let arena = try BufferArena(ring: ring, bytes: 64 << 10)
        let a = arena.allocate(5000)!
        #expect(a.capacity == 8192 && Int(bitPattern: a.base) % 4096 == 0)
        arena.release(a)
        let b = arena.allocate(8000)!
        #expect(b.base == a.base)
        let big = arena.allocate(2 << 20)!
        #expect(!big.isFixed && big.capacity >= 2 << 20)
        arena.release(big)
        var held: [BufferArena.Buffer] = []
        for _ in 0..<20 { held.append(arena.allocate(4096)!) }
        #expect(held.contains { !$0.isFixed })  // 64 KiB arena: the rest is mapped separately
        held.forEach(arena.release)
    }

    @Test func multishotReceiveUsesProvidedBuffersUntilEndOfStream() throws {
        let ring = try Ring(entries: 16)
        let buffers = try ProvidedBuffers(ring: ring, groupID: 7, count: 8, bufferSize: 4096)
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        let (local, remote) = (FileDescriptor(rawValue: pair[0]), FileDescriptor(rawValue: pair[1]))
        defer { local.close() }
        ring.receiveMultishot(local, group: buffers, userData: 42)
        try ring.submit()
        var received: [UInt8] = []
        for chunk in 0..<5 {
            try remote.writeAll([UInt8](repeating: UInt8(chunk), count: 3000))
            for completion in try completions(ring, count: 1) {
                #expect(completion.userData == 42 && completion.hasMore)
                let id = try #require(completion.bufferID)
                received += buffers.bytes(of: id, count: Int(completion.result))
                buffers.recycle(id)
            }
            buffers.publish()
        }
        remote.close()
        var ended = false
        for completion in try completions(ring, count: 1) where completion.result == 0 { ended = !completion.hasMore }
        #expect(ended)
        #expect(received.count == 15000)
        #expect(received[3000] == 1 && received[14999] == 4)
    }

    @Test func sendmsgAndTimeoutAndCancel() throws {
        let ring = try Ring(entries: 16)
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        let (local, remote) = (FileDescriptor(rawValue: pair[0]), FileDescriptor(rawValue: pair[1]))
        defer { local.close(); remote.close() }
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 5, alignment: 8)
        defer { bytes.deallocate() }
        bytes.copyBytes(from: [1, 2, 3, 4, 5] as [UInt8])
        let iovs = UnsafeMutablePointer<iovec>.allocate(capacity: 2)
        defer { iovs.deallocate() }
        iovs[0] = iovec(iov_base: bytes.baseAddress, iov_len: 3)
        iovs[1] = iovec(iov_base: bytes.baseAddress! + 3, iov_len: 2)
        let message = UnsafeMutablePointer<msghdr>.allocate(capacity: 1)
        defer { message.deallocate() }
        message.initialize(to: msghdr())
        message.pointee.msg_iov = iovs
        message.pointee.msg_iovlen = 2
        ring.sendMessage(local, message, userData: 5)
        #expect(try completions(ring, count: 1).map(\.result) == [5])
        #expect(try remote.read(upTo: 16) == [1, 2, 3, 4, 5])

        let soon = TimeoutDuration(nanoseconds: 1_000_000)
        ring.timeout(soon, userData: 6)
        #expect(try completions(ring, count: 1).map(\.result) == [-ETIME])

        let later = TimeoutDuration(nanoseconds: 60_000_000_000)
        ring.timeout(later, userData: 7)
        ring.cancel(userData: 7, userData: 8)
        let results = Dictionary(uniqueKeysWithValues: try completions(ring, count: 2).map { ($0.userData, $0.result) })
        #expect(results[7] == -ECANCELED && results[8] == 0)
    }
}
