import CSyscalls
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A file's allocation from SEEK_DATA and SEEK_HOLE, for `base:allocation`.
public enum FileAllocation {
    /// The run that starts at `position` (and ends at `end` at the latest):
    /// data or a hole. A seek that fails otherwise says data, which is always
    /// a safe answer.
    public static func run(of fd: FileDescriptor, at position: UInt64, before end: UInt64) -> (end: UInt64, isData: Bool) {
        let data = lseek(fd.rawValue, off_t(position), keel_seek_data)
        if data < 0 { return (end, errno != ENXIO) }
        if UInt64(data) > position { return (min(end, UInt64(data)), false) }
        let hole = lseek(fd.rawValue, off_t(position), keel_seek_hole)
        return (hole > 0 ? min(end, UInt64(hole)) : end, true)
    }
}
