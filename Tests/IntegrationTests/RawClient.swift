import Foundation
import NBDProtocol
import Syscalls

/// A hand-driven NBD client over a blocking socket, for sending what no
/// well-behaved library would. Every read has a timeout, so a server that
/// hangs fails the test instead of hanging it.
final class RawClient {
    let fd: FileDescriptor

    init(_ address: String, timeoutSeconds: Int = 10) throws {
        // A server that closes on us must fail a send, not kill the test process.
        signal(SIGPIPE, SIG_IGN)
        fd = try Socket.connect(to: try SocketAddress(parsing: address))
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { fd.close() }

    func send(_ bytes: [UInt8]) throws { try fd.writeAll(bytes) }

    /// Exactly `count` bytes, or nil if the server closed the connection first.
    func receive(_ count: Int) throws -> [UInt8]? {
        var result: [UInt8] = []
        while result.count < count {
            let chunk = try fd.read(upTo: count - result.count)
            if chunk.isEmpty { return nil }
            result += chunk
        }
        return result
    }

    /// True if the server closed the connection (rather than timing out).
    func isClosedByServer() -> Bool {
        do {
            while true {
                if try fd.read(upTo: 4096).isEmpty { return true }
            }
        } catch {
            return (error as? SystemError)?.errno == ECONNRESET
        }
    }

    // MARK: - Protocol steps

    /// Reads the greeting and sends the client flags.
    func greet(flags: UInt32 = 3) throws {
        let greeting = try receive(18)
        guard greeting == Handshake.greeting else { throw TestFailure("unexpected greeting \(String(describing: greeting))") }
        var bytes: [UInt8] = []
        bytes.appendBigEndian(flags)
        try send(bytes)
    }

    func sendOption(_ option: UInt32, _ data: [UInt8] = []) throws {
        var bytes: [UInt8] = []
        bytes.appendBigEndian(NBDMagic.option)
        bytes.appendBigEndian(option)
        bytes.appendBigEndian(UInt32(data.count))
        try send(bytes + data)
    }

    /// One option reply: (reply type, data).
    func receiveOptionReply() throws -> (UInt32, [UInt8])? {
        guard let header = try receive(20) else { return nil }
        let length = Int(header.loadBigEndian(at: 16, as: UInt32.self))
        guard let data = try receive(length) else { return nil }
        return (header.loadBigEndian(at: 12, as: UInt32.self), data)
    }

    /// Greets and enters transmission with EXPORT_NAME "" (simple replies).
    func enterTransmission() throws {
        try greet()
        try sendOption(OptionType.exportName.rawValue)
        guard try receive(10) != nil else { throw TestFailure("no EXPORT_NAME reply") }
    }

    func sendRequest(_ header: RequestHeader, payload: [UInt8] = []) throws {
        try send(header.encoded + payload)
    }

    /// A simple reply: (error, handle).
    func receiveSimpleReply() throws -> (UInt32, UInt64)? {
        guard let reply = try receive(16) else { return nil }
        guard reply.loadBigEndian(at: 0, as: UInt32.self) == NBDMagic.simpleReply else {
            throw TestFailure("not a simple reply: \(reply)")
        }
        return (reply.loadBigEndian(at: 4, as: UInt32.self), reply.loadBigEndian(at: 8, as: UInt64.self))
    }
}
