import CLiburing
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Typed preparation of the operations Keel uses. Each queues one entry;
/// nothing is sent to the kernel until the owner submits.
extension Ring {
    @inlinable
    public func read(_ fd: FileDescriptor, into buffer: UnsafeMutableRawPointer, count: Int, at offset: UInt64,
                     fixed: Bool, userData: UInt64) {
        let sqe = nextSubmission()
        if fixed {
            io_uring_prep_read_fixed(sqe, fd.rawValue, buffer, UInt32(count), offset, 0)
        } else {
            io_uring_prep_read(sqe, fd.rawValue, buffer, UInt32(count), offset)
        }
        sqe.pointee.user_data = userData
    }

    /// `dataSync` asks for RWF_DSYNC: the write is on stable storage when it completes (FUA).
    @inlinable
    public func write(_ fd: FileDescriptor, from buffer: UnsafeRawPointer, count: Int, at offset: UInt64,
                      fixed: Bool, dataSync: Bool, userData: UInt64) {
        let sqe = nextSubmission()
        if fixed {
            io_uring_prep_write_fixed(sqe, fd.rawValue, buffer, UInt32(count), offset, 0)
        } else {
            io_uring_prep_write(sqe, fd.rawValue, buffer, UInt32(count), offset)
        }
        if dataSync { sqe.pointee.rw_flags = Int32(RWF_DSYNC) }
        sqe.pointee.user_data = userData
    }

    @inlinable
    public func fdatasync(_ fd: FileDescriptor, userData: UInt64) {
        let sqe = nextSubmission()
        io_uring_prep_fsync(sqe, fd.rawValue, UInt32(IORING_FSYNC_DATASYNC))
        sqe.pointee.user_data = userData
    }

    @inlinable
    public func fallocate(_ fd: FileDescriptor, mode: Int32, offset: UInt64, length: UInt64, userData: UInt64) {
        let sqe = nextSubmission()
        io_uring_prep_fallocate(sqe, fd.rawValue, mode, off_t(offset), off_t(length))
        sqe.pointee.user_data = userData
    }

    @inlinable
    public func sendMessage(_ fd: FileDescriptor, _ message: UnsafePointer<msghdr>, userData: UInt64) {
        let sqe = nextSubmission()
        io_uring_prep_sendmsg(sqe, fd.rawValue, message, UInt32(MSG_NOSIGNAL))
        sqe.pointee.user_data = userData
    }

    /// Multishot receive into buffers of `group`: one completion per arrival
    /// until the socket closes, an error occurs, or the group runs dry.
    @inlinable
    public func receiveMultishot(_ fd: FileDescriptor, group: ProvidedBuffers, userData: UInt64) {
        let sqe = nextSubmission()
        io_uring_prep_recv_multishot(sqe, fd.rawValue, nil, 0, 0)
        sqe.pointee.flags |= keel_iosqe_buffer_select
        sqe.pointee.buf_group = group.groupID
        sqe.pointee.user_data = userData
    }

    /// Multishot accept: one completion per new connection.
    public func acceptMultishot(_ fd: FileDescriptor, userData: UInt64) {
        let sqe = nextSubmission()
        io_uring_prep_multishot_accept(sqe, fd.rawValue, nil, nil, Int32(SOCK_CLOEXEC.rawValue))
        sqe.pointee.user_data = userData
    }

    /// A one-shot read of an eventfd's 8-byte counter.
    public func readEvent(_ fd: FileDescriptor, into counter: UnsafeMutablePointer<UInt64>, userData: UInt64) {
        let sqe = nextSubmission()
        io_uring_prep_read(sqe, fd.rawValue, counter, 8, 0)
        sqe.pointee.user_data = userData
    }

    /// Waits for `events` (POLLIN, POLLOUT) on `fd`; `multishot` keeps it armed.
    public func poll(_ fd: Int32, events: Int16, multishot: Bool, userData: UInt64) {
        let sqe = nextSubmission()
        if multishot {
            io_uring_prep_poll_multishot(sqe, fd, UInt32(UInt16(bitPattern: events)))
        } else {
            io_uring_prep_poll_add(sqe, fd, UInt32(UInt16(bitPattern: events)))
        }
        sqe.pointee.user_data = userData
    }

    /// A completion with no work: how code outside a completion hands a result to the loop.
    @inlinable
    public func nop(userData: UInt64) {
        let sqe = nextSubmission()
        io_uring_prep_nop(sqe)
        sqe.pointee.user_data = userData
    }

    public func cancel(userData target: UInt64, userData: UInt64) {
        let sqe = nextSubmission()
        io_uring_prep_cancel64(sqe, target, 0)
        sqe.pointee.user_data = userData
    }

    /// Completes with -ETIME after `duration`; `duration` must live until then.
    public func timeout(_ duration: TimeoutDuration, userData: UInt64) {
        let sqe = nextSubmission()
        io_uring_prep_timeout(sqe, duration.spec, 0, 0)
        sqe.pointee.user_data = userData
    }
}

/// A relative timeout in memory that stays put while the kernel reads it.
public final class TimeoutDuration {
    let spec = UnsafeMutablePointer<__kernel_timespec>.allocate(capacity: 1)

    public init(nanoseconds: Int64) {
        spec.pointee = __kernel_timespec(tv_sec: nanoseconds / 1_000_000_000, tv_nsec: nanoseconds % 1_000_000_000)
    }

    deinit { spec.deallocate() }
}
