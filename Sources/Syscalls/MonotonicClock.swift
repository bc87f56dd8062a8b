#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC in nanoseconds: deadlines and ages that a wall clock set back cannot stretch.
@inlinable
public func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

/// CLOCK_MONOTONIC in seconds.
@inlinable
public func monotonicSeconds() -> Double {
    Double(monotonicNanoseconds()) / 1e9
}
