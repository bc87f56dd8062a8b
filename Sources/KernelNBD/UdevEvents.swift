import CNetlink
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// The events udev sends after it has run its rules for a device (the
/// netlink uevent socket's group 2, where udevd rebroadcasts what it
/// processed, with its links made). Waiting on them, not on a timer, is how
/// a caller knows udev is done with a device, however busy the host.
public final class UdevEvents {
    private let fd: Int32
    /// udevd's group on NETLINK_KOBJECT_UEVENT (the kernel's own events are group 1).
    private static let udevGroup: UInt32 = 2

    public init() throws {
        fd = try openNetlinkSocket(15 /* NETLINK_KOBJECT_UEVENT */, groups: Self.udevGroup)
    }

    deinit { close(fd) }

    /// Waits until udev has processed an event of `device` (such as `nbd0`)
    /// that it received after this call began, until `done` holds (checked
    /// every second: where udev's messages cannot reach this socket, as in
    /// another network namespace, the result still shows), or until `seconds`
    /// pass. Returns whether an event came or `done` held.
    public func waitForProcessedEvent(of device: String, seconds: Double, or done: () -> Bool = { false }) -> Bool {
        let deadline = monotonicSeconds() + seconds
        var buffer = [UInt8](repeating: 0, count: 16384)
        while true {
            if done() { return true }
            let left = deadline - monotonicSeconds()
            guard left > 0 else { return false }
            var ready = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&ready, 1, Int32(min(left, 1) * 1000) + 1) > 0 else { continue }
            let received = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            guard received > 0 else { continue }
            if Self.properties(Array(buffer.prefix(received)))["DEVNAME"].map({ $0 == device || $0 == "/dev/" + device }) == true {
                return true
            }
        }
    }

    /// The KEY=value properties of one udev message ("libudev" header, then
    /// NUL-separated properties at the offset the header gives).
    static func properties(_ message: [UInt8]) -> [String: String] {
        guard message.count >= 40, message.starts(with: Array("libudev".utf8) + [0]) else { return [:] }
        let offset = Int(message[16]) | Int(message[17]) << 8 | Int(message[18]) << 16 | Int(message[19]) << 24
        guard offset > 0, offset < message.count else { return [:] }
        var result: [String: String] = [:]
        for field in message[offset...].split(separator: 0) {
            let text = String(decoding: field, as: UTF8.self)
            if let equals = text.firstIndex(of: "=") {
                result[String(text[..<equals])] = String(text[text.index(after: equals)...])
            }
        }
        return result
    }
}
