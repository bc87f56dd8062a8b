import CSyscalls
#if canImport(Glibc)
import Glibc
#endif

/// An eventfd: how one thread wakes another thread's io_uring.
public struct EventFD: Sendable {
    public let descriptor: FileDescriptor

    public init() throws {
        let fd = eventfd(0, Int32(EFD_CLOEXEC))
        guard fd >= 0 else { throw SystemError.current("eventfd") }
        descriptor = FileDescriptor(rawValue: fd)
    }

    public func signal() {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(descriptor.rawValue, $0.baseAddress, 8) }
    }
}
