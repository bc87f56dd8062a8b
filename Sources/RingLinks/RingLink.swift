import IOUring
import LibNBD
import NBDServer
#if canImport(Glibc)
import Glibc
#endif

/// A libnbd handle driven from an I/O thread's ring (the engine's link to a
/// replica, a snapshot export's): a one-shot poll for replies is always
/// armed, and one for sending while libnbd has bytes queued; their
/// completions carry `IOToken.worker(index, sub: pollIn or pollOut)`.
///
/// A dead link is never driven again: its handle stays open, so libnbd never
/// calls back for its commands, which the owner retires itself (late replies
/// would complete commands already retired and reused).
public struct RingLink {
    public static let pollIn: UInt8 = 1
    public static let pollOut: UInt8 = 2

    public private(set) var client: NBDClient?
    public private(set) var dead = false
    private var pollingIn = false
    private var pollingOut = false

    public init(client: NBDClient? = nil) {
        self.client = client
    }

    /// A link that never connected.
    public static var failed: RingLink {
        var link = RingLink()
        link.dead = true
        return link
    }

    /// The handle, while the link lives.
    public var live: NBDClient? { dead ? nil : client }

    /// Arms the polls the handle needs. False when libnbd says the connection
    /// is dead: the owner retires the link (`die`) outside libnbd's callbacks.
    public mutating func service(index: Int, ring: Ring) -> Bool {
        guard let client = live else { return true }
        if client.isDead { return false }
        if !pollingIn {
            pollingIn = true
            ring.poll(client.descriptor, events: Int16(POLLIN), multishot: false,
                      userData: IOToken.worker(index, sub: Self.pollIn).rawValue)
        }
        if client.wantsToWrite && !pollingOut {
            pollingOut = true
            ring.poll(client.descriptor, events: Int16(POLLOUT), multishot: false,
                      userData: IOToken.worker(index, sub: Self.pollOut).rawValue)
        }
        return true
    }

    /// One of the link's polls completed: libnbd reads or writes (and may
    /// call back). Then call `service` again.
    ///
    /// A readable socket is peeked first: a POLLIN completion can be stale
    /// by the time it is handled (seen under load after rebuilds), and
    /// libnbd told to read with nothing there waits in REPLY.START, where it
    /// issues none of the commands queued meanwhile: with no reply still to
    /// come the link stops until the replica timeout fails it.
    public mutating func polled(sub: UInt8) {
        guard let client = live else { return }
        if sub == Self.pollIn {
            pollingIn = false
            var byte: UInt8 = 0
            let peeked = recv(client.descriptor, &byte, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
            if peeked < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
            client.notifyReadable()
        } else {
            pollingOut = false
            client.notifyWritable()
        }
    }

    /// What the handle and the polls are doing, for a log line about a link that went quiet.
    public var diagnostics: String {
        guard let client else { return "no connection" }
        return "\(client.stateDescription), polling\(pollingIn ? " in" : "")\(pollingOut ? " out" : "")"
    }

    /// The link is dead from now on; its socket is shut down.
    public mutating func die() {
        dead = true
        if let client { shutdown(client.descriptor, Int32(SHUT_RDWR)) }
    }
}
