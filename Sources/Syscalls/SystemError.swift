#if canImport(Glibc)
import Glibc
#endif

/// An errno value together with what Keel was doing when it got it.
public struct SystemError: Error, CustomStringConvertible, Equatable {
    public let errno: Int32
    public let operation: String

    public init(errno: Int32, _ operation: String) {
        self.errno = errno
        self.operation = operation
    }

    /// Captures the calling thread's current `errno`.
    public static func current(_ operation: String) -> SystemError {
        SystemError(errno: Glibc.errno, operation)
    }

    public var description: String {
        "\(operation): \(String(cString: strerror(errno)))"
    }
}

/// Retries a syscall while it fails with EINTR; throws on any other failure.
@discardableResult
public func retryingOnInterrupt<T: BinaryInteger>(_ operation: String, _ call: () -> T) throws -> T {
    while true {
        let result = call()
        if result >= 0 { return result }
        if Glibc.errno == EINTR { continue }
        throw SystemError.current(operation)
    }
}
