import CSyscalls
#if canImport(Glibc)
import Glibc
#endif

/// fsfreeze(8) as its two ioctls on a mount point: `freeze` writes the file
/// system's dirty data and holds new writes until `thaw`, so that a
/// snapshot taken in between needs no journal replay.
public enum FileSystemFreeze {
    public static func freeze(_ mountpoint: String) throws {
        try call(mountpoint, "freeze", keel_freeze_filesystem)
    }

    public static func thaw(_ mountpoint: String) throws {
        try call(mountpoint, "thaw", keel_thaw_filesystem)
    }

    private static func call(_ mountpoint: String, _ what: String, _ ioctl: (Int32) -> Int32) throws {
        let fd = open(mountpoint, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.current("\(what) \(mountpoint)") }
        defer { close(fd) }
        try retryingOnInterrupt("\(what) \(mountpoint)") { ioctl(fd) }
    }
}
