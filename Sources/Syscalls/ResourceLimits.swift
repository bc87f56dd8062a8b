#if canImport(Glibc)
import Glibc
#endif

/// A replica holds two descriptors per snapshot layer (data and map log):
/// a chain of 1000 needs more than the usual soft limit of 1024. The hard
/// limit is the administrator's (systemd's default is 524288).
public func raiseOpenFileLimitToHard() {
    var limit = rlimit()
    guard getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
    limit.rlim_cur = limit.rlim_max
    _ = setrlimit(RLIMIT_NOFILE_VALUE, &limit)
}

private let RLIMIT_NOFILE_VALUE = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
