import CDeviceMapper
#if canImport(Glibc)
import Glibc
#endif

/// A device-mapper linear device over the whole of one block device:
/// `/dev/mapper/NAME`. A host mounts it instead of `/dev/nbdX`, so that I/O
/// can be held above the NBD device (`suspend`) while the connections under
/// it change, with nothing in flight on them.
public struct LinearDevice: Sendable {
    public let name: String

    public var path: String { "/dev/mapper/\(name)" }

    public init(name: String) {
        self.name = name
    }

    /// Maps all of `underlying` (`sectors` of 512 bytes) as NAME; an existing
    /// NAME (left by a frontend that died) is loaded with the new table instead.
    public static func create(name: String, over underlying: String, sectors: UInt64) throws -> LinearDevice {
        dm_udev_set_sync_support(0)
        let device = LinearDevice(name: name)
        let table = { (task: OpaquePointer) in dm_task_add_target(task, 0, sectors, "linear", "\(underlying) 0") }
        if device.exists {
            try device.run(Int32(DM_DEVICE_RELOAD), "reload", table)
            try device.resume()
        } else {
            try device.run(Int32(DM_DEVICE_CREATE), "create", table)
        }
        return device
    }

    public var exists: Bool {
        guard let task = dm_task_create(Int32(DM_DEVICE_INFO)) else { return false }
        defer { dm_task_destroy(task) }
        var info = dm_info()
        return dm_task_set_name(task, name) != 0 && dm_task_run(task) != 0 && dm_task_get_info(task, &info) != 0 && info.exists != 0
    }

    /// Holds new I/O and returns once none is in flight below. The file
    /// system on it is not frozen (nothing is written back first): only the
    /// requests already sent have to finish.
    public func suspend() throws {
        try run(Int32(DM_DEVICE_SUSPEND), "suspend") { dm_task_skip_lockfs($0) }
    }

    /// Lets the held I/O go on.
    public func resume() throws {
        try run(Int32(DM_DEVICE_RESUME), "resume")
    }

    /// Removes it, or once its last user closes it (a mounted file system).
    public func remove() throws {
        try run(Int32(DM_DEVICE_REMOVE), "remove") { dm_task_deferred_remove($0) }
    }

    private func run(_ type: Int32, _ what: String, _ configure: (OpaquePointer) -> Int32 = { _ in 1 }) throws {
        guard let task = dm_task_create(type) else {
            throw DeviceMapperError("cannot start a device-mapper \(what) (is the dm_mod module loaded?)")
        }
        defer { dm_task_destroy(task) }
        guard dm_task_set_name(task, name) != 0, configure(task) != 0 else {
            throw DeviceMapperError("cannot prepare the device-mapper \(what) of \(name)")
        }
        guard dm_task_run(task) != 0 else {
            let errno = dm_task_get_errno(task)
            throw DeviceMapperError("device-mapper \(what) of \(name) failed: \(String(cString: strerror(errno)))")
        }
        // Without udev's help, libdevmapper makes and removes /dev/mapper/NAME when asked to.
        dm_task_update_nodes()
    }
}

public struct DeviceMapperError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}
