import CLibNBD
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A failed libnbd call: the errno the server (or libnbd) reported, and libnbd's message.
public struct NBDClientError: Error, CustomStringConvertible {
    public let errno: Int32
    public let message: String

    static func last() -> NBDClientError {
        NBDClientError(errno: nbd_get_errno(), message: nbd_get_error().map { String(cString: $0) } ?? "unknown libnbd error")
    }

    public var description: String { message }
}

/// A thin Swift wrapper over one libnbd handle (one NBD connection).
/// Not thread-safe, like the handle it wraps.
public final class NBDClient {
    public struct CommandFlags: OptionSet {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let fua = CommandFlags(rawValue: LIBNBD_CMD_FLAG_FUA)
        public static let noHole = CommandFlags(rawValue: LIBNBD_CMD_FLAG_NO_HOLE)
        public static let dontFragment = CommandFlags(rawValue: LIBNBD_CMD_FLAG_DF)
        public static let requestOne = CommandFlags(rawValue: LIBNBD_CMD_FLAG_REQ_ONE)
        public static let fastZero = CommandFlags(rawValue: LIBNBD_CMD_FLAG_FAST_ZERO)
    }

    public struct Extent: Equatable {
        public var length: UInt32
        public var flags: UInt32

        public init(length: UInt32, flags: UInt32) {
            self.length = length
            self.flags = flags
        }
    }

    let handle: OpaquePointer

    public init() throws {
        guard let handle = nbd_create() else { throw NBDClientError.last() }
        self.handle = handle
    }

    deinit { nbd_close(handle) }

    // MARK: - Before connecting

    public func setExportName(_ name: String) throws {
        try check(nbd_set_export_name(handle, name))
    }

    public func requestStructuredReplies(_ enable: Bool) throws {
        try check(nbd_set_request_structured_replies(handle, enable))
    }

    public func addMetaContext(_ name: String) throws {
        try check(nbd_add_meta_context(handle, name))
    }

    /// Turns off libnbd's own checks so that bad requests reach the server.
    public func disableClientSideChecks() throws {
        try check(nbd_set_strict_mode(handle, 0))
    }

    /// Stops after the handshake's option phase (for LIST, INFO, ...).
    public func setOptionMode(_ enable: Bool) throws {
        try check(nbd_set_opt_mode(handle, enable))
    }

    // MARK: - Connecting

    public func connect(uri: String) throws { try check(nbd_connect_uri(handle, uri)) }
    public func connect(unixSocket path: String) throws { try check(nbd_connect_unix(handle, path)) }
    public func connect(host: String, port: UInt16) throws { try check(nbd_connect_tcp(handle, host, String(port))) }

    public func go() throws { try check(nbd_opt_go(handle)) }
    /// NBD_OPT_INFO for the export name set: fills in size and flags without opening it.
    public func info() throws { try check(nbd_opt_info(handle)) }
    public func abortOptions() throws { try check(nbd_opt_abort(handle)) }

    /// NBD_OPT_LIST: the exports the server offers.
    public func listExports() throws -> [String] {
        final class Names { var list: [String] = [] }
        let names = Names()
        let context = Unmanaged.passUnretained(names).toOpaque()
        let callback = nbd_list_callback(callback: { data, name, _ in
            Unmanaged<Names>.fromOpaque(data!).takeUnretainedValue().list.append(String(cString: name!))
            return 0
        }, user_data: context, free: nil)
        try check(nbd_opt_list(handle, callback))
        return names.list
    }

    /// NBD_OPT_LIST_META_CONTEXT for the export name set and the queries
    /// `addMetaContext` added: the contexts the server offers.
    public func listMetaContexts() throws -> [String] {
        final class Names { var list: [String] = [] }
        let names = Names()
        let context = Unmanaged.passUnretained(names).toOpaque()
        let callback = nbd_context_callback(callback: { data, name in
            Unmanaged<Names>.fromOpaque(data!).takeUnretainedValue().list.append(String(cString: name!))
            return 0
        }, user_data: context, free: nil)
        try check(Int32(nbd_opt_list_meta_context(handle, callback)))
        return names.list
    }

    public func shutdown() throws { try check(nbd_shutdown(handle, 0)) }

    /// Ends the connection without waiting for the server: NBD_CMD_DISC queued if the
    /// handle can take it, the socket shut down. For a peer that may be gone (a replica
    /// whose node is down), where `shutdown()` would wait until TCP gives up, minutes later.
    public func abandon() {
        _ = nbd_aio_disconnect(handle, 0)
        let fd = nbd_aio_get_fd(handle)
        if fd >= 0 { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    }

    // MARK: - What the server offers

    public var size: UInt64 { get throws { UInt64(try check64(nbd_get_size(handle))) } }
    public var isReadOnly: Bool { nbd_is_read_only(handle) == 1 }
    public var canFlush: Bool { nbd_can_flush(handle) == 1 }
    public var canFUA: Bool { nbd_can_fua(handle) == 1 }
    public var canTrim: Bool { nbd_can_trim(handle) == 1 }
    public var canZero: Bool { nbd_can_zero(handle) == 1 }
    public var canFastZero: Bool { nbd_can_fast_zero(handle) == 1 }
    public var canCache: Bool { nbd_can_cache(handle) == 1 }
    public var canMultiConn: Bool { nbd_can_multi_conn(handle) == 1 }
    public var structuredRepliesNegotiated: Bool { nbd_get_structured_replies_negotiated(handle) == 1 }

    public func canMetaContext(_ name: String) -> Bool { nbd_can_meta_context(handle, name) == 1 }

    /// (minimum, preferred, maximum) from NBD_INFO_BLOCK_SIZE.
    public func blockSizes() throws -> (Int64, Int64, Int64) {
        (try check64(nbd_get_block_size(handle, Int32(LIBNBD_SIZE_MINIMUM))),
         try check64(nbd_get_block_size(handle, Int32(LIBNBD_SIZE_PREFERRED))),
         try check64(nbd_get_block_size(handle, Int32(LIBNBD_SIZE_MAXIMUM))))
    }

    // MARK: - Commands (synchronous)

    public func read(count: Int, at offset: UInt64, flags: CommandFlags = []) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { raw in
            try check(nbd_pread(handle, raw.baseAddress, count, offset, flags.rawValue))
        }
        return bytes
    }

    public func write(_ bytes: [UInt8], at offset: UInt64, flags: CommandFlags = []) throws {
        try bytes.withUnsafeBytes { raw in
            try check(nbd_pwrite(handle, raw.baseAddress, raw.count, offset, flags.rawValue))
        }
    }

    public func flush() throws { try check(nbd_flush(handle, 0)) }

    public func trim(count: UInt64, at offset: UInt64, flags: CommandFlags = []) throws {
        try check(nbd_trim(handle, count, offset, flags.rawValue))
    }

    public func zero(count: UInt64, at offset: UInt64, flags: CommandFlags = []) throws {
        try check(nbd_zero(handle, count, offset, flags.rawValue))
    }

    public func cache(count: UInt64, at offset: UInt64) throws {
        try check(nbd_cache(handle, count, offset, 0))
    }

    /// The extents of one metadata context (`base:allocation` by default),
    /// which `addMetaContext` selected before connecting.
    public func blockStatus(count: UInt64, at offset: UInt64, flags: CommandFlags = [],
                            context: String = "base:allocation") throws -> [Extent] {
        final class Extents {
            let context: String
            var list: [Extent] = []
            init(context: String) { self.context = context }
        }
        let extents = Extents(context: context)
        let userData = Unmanaged.passUnretained(extents).toOpaque()
        let callback = nbd_extent_callback(callback: { data, name, _, entries, count, _ in
            let box = Unmanaged<Extents>.fromOpaque(data!).takeUnretainedValue()
            guard let name, String(cString: name) == box.context else { return 0 }
            var i = 0
            while i + 1 < count {
                box.list.append(Extent(length: entries![i], flags: entries![i + 1]))
                i += 2
            }
            return 0
        }, user_data: userData, free: nil)
        try check(nbd_block_status(handle, count, offset, callback, flags.rawValue))
        return extents.list
    }

    // MARK: - Commands in flight (asynchronous)

    /// Starts a write; `buffer` must stay valid until the command completes.
    public func startWrite(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws -> Int64 {
        try check64(nbd_aio_pwrite(handle, buffer.baseAddress, buffer.count, offset,
                                   nbd_completion_callback(callback: nil, user_data: nil, free: nil), 0))
    }

    /// Starts a read into `buffer`, which must stay valid until the command completes.
    public func startRead(_ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int64 {
        try check64(nbd_aio_pread(handle, buffer.baseAddress, buffer.count, offset,
                                  nbd_completion_callback(callback: nil, user_data: nil, free: nil), 0))
    }

    public var commandsInFlight: Int { Int(nbd_aio_in_flight(handle)) }

    /// Reads `count` bytes as pieces of `piece` bytes all in flight at once: a server works on
    /// them in parallel, where one large request waited for in turn leaves it idle between.
    public func readInPieces(count: Int, at offset: UInt64, piece: Int) throws -> [UInt8] {
        var failure: Error?
        let bytes = [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            do {
                try readInPieces(into: UnsafeMutableRawBufferPointer(buffer), at: offset, piece: piece)
                initialized = count
            } catch {
                failure = error
                initialized = 0
            }
        }
        if let failure { throw failure }
        return bytes
    }

    /// Fills `buffer` from `offset` (see `readInPieces(count:at:piece:)`).
    public func readInPieces(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, piece: Int) throws {
        let cookies = try stride(from: 0, to: buffer.count, by: piece).map { start in
            try startRead(UnsafeMutableRawBufferPointer(rebasing: buffer[start ..< min(start + piece, buffer.count)]), at: offset + UInt64(start))
        }
        try waitForAll(cookies)
    }

    /// Writes `bytes` as pieces of `piece` bytes all in flight at once (see `readInPieces`).
    public func writeInPieces(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, piece: Int) throws {
        try waitForAll(try startWriteInPieces(bytes, at: offset, piece: piece))
    }

    /// Starts the pieces' writes and returns their cookies for `waitForAll`; `bytes` must stay valid until then.
    public func startWriteInPieces(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, piece: Int) throws -> [Int64] {
        try stride(from: 0, to: bytes.count, by: piece).map { start in
            try startWrite(UnsafeRawBufferPointer(rebasing: bytes[start ..< min(start + piece, bytes.count)]), at: offset + UInt64(start))
        }
    }

    /// Until every command finished (each retired once), or the first failure; a server silent for
    /// two minutes is a failure.
    public func waitForAll(_ cookies: [Int64]) throws {
        var pending = cookies
        var deadline = Date().addingTimeInterval(120)
        while true {
            let before = pending.count
            pending = try pending.filter { try !isComplete($0) }
            if pending.isEmpty { return }
            if pending.count < before { deadline = Date().addingTimeInterval(120) }
            guard Date() < deadline else { throw NBDClientError(errno: ETIMEDOUT, message: "the server answered none of \(pending.count) request(s) for two minutes") }
            try poll(milliseconds: 1000)
        }
    }

    /// Waits for traffic for up to `milliseconds`.
    public func poll(milliseconds: Int32) throws { try check(nbd_poll(handle, milliseconds)) }

    /// Waits up to `milliseconds` for traffic on any of `clients`' connections, then lets each
    /// ready one read or write (`nbd_poll` for several handles: their commands progress together).
    public static func poll(_ clients: [NBDClient], milliseconds: Int32) throws {
        var descriptors = clients.map { client in
            pollfd(fd: client.descriptor, events: Int16(POLLIN) | (client.wantsToWrite ? Int16(POLLOUT) : 0), revents: 0)
        }
        let ready = Glibc.poll(&descriptors, nfds_t(descriptors.count), milliseconds)
        if ready < 0 && errno != EINTR { throw NBDClientError(errno: errno, message: "poll: \(String(cString: strerror(errno)))") }
        guard ready > 0 else { return }
        for (client, descriptor) in zip(clients, descriptors) where descriptor.revents != 0 {
            if descriptor.revents & Int16(POLLOUT) != 0 { client.notifyWritable() }
            if descriptor.revents & ~Int16(POLLOUT) != 0 { client.notifyReadable() }
        }
    }

    /// True once the command finished; throws if it failed.
    public func isComplete(_ cookie: Int64) throws -> Bool {
        let rc = nbd_aio_command_completed(handle, UInt64(cookie))
        if rc < 0 { throw NBDClientError.last() }
        return rc == 1
    }

    // MARK: -

    func check(_ rc: Int32) throws {
        if rc < 0 { throw NBDClientError.last() }
    }

    @discardableResult
    private func check64(_ rc: Int64) throws -> Int64 {
        if rc < 0 { throw NBDClientError.last() }
        return rc
    }
}

/// Driving a handle from someone else's event loop (the engine's rings):
/// commands with completion callbacks, the socket, and the notify calls.
extension NBDClient {
    /// Called by libnbd when a command finishes: (context, pointer to errno or 0).
    public typealias CompletionFunction = @convention(c) (UnsafeMutableRawPointer?, UnsafeMutablePointer<Int32>?) -> Int32

    public enum Command {
        case read(UnsafeMutableRawPointer, count: Int, offset: UInt64)
        case write(UnsafeRawPointer, count: Int, offset: UInt64)
        case flush
        case trim(count: UInt64, offset: UInt64)
        case zero(count: UInt64, offset: UInt64)
    }

    /// The connection's socket, to poll.
    public var descriptor: Int32 { nbd_aio_get_fd(handle) }

    /// libnbd has bytes to send and is waiting for the socket to be writable.
    public var wantsToWrite: Bool { nbd_aio_get_direction(handle) & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 }

    public var isDead: Bool { nbd_aio_is_dead(handle) == 1 || nbd_aio_is_closed(handle) == 1 }

    /// libnbd's own words for where the connection's state machine is, for diagnostics.
    public var stateDescription: String {
        let direction = nbd_aio_get_direction(handle)
        let state = nbd_connection_state(handle).map { String(cString: $0) } ?? "unknown"
        return "\(state), \(commandsInFlight) in flight, direction \(direction)"
    }

    public func notifyReadable() { _ = nbd_aio_notify_read(handle) }
    public func notifyWritable() { _ = nbd_aio_notify_write(handle) }

    /// Called by libnbd with a BLOCK_STATUS answer, once per context:
    /// (context, context name, offset, (length, flags) pairs, entry count, pointer to errno).
    public typealias ExtentFunction = @convention(c) (UnsafeMutableRawPointer?, UnsafePointer<CChar>?, UInt64,
                                                      UnsafeMutablePointer<UInt32>?, Int, UnsafeMutablePointer<Int32>?) -> Int32

    /// Queues a BLOCK_STATUS: `extents` runs for each selected context's answer, then `function`.
    public func submitBlockStatus(count: UInt64, offset: UInt64, flags: CommandFlags = [], extents: ExtentFunction,
                                  function: CompletionFunction, context: UnsafeMutableRawPointer) throws {
        let extentCallback = nbd_extent_callback(callback: extents, user_data: context, free: nil)
        let completion = nbd_completion_callback(callback: function, user_data: context, free: nil)
        if nbd_aio_block_status(handle, count, offset, extentCallback, completion, flags.rawValue) < 0 {
            throw NBDClientError.last()
        }
    }

    /// Queues a command; `function(context, &error)` runs when it finishes.
    public func submit(_ command: Command, flags: CommandFlags = [], function: CompletionFunction,
                       context: UnsafeMutableRawPointer) throws {
        let completion = nbd_completion_callback(callback: function, user_data: context, free: nil)
        let rc: Int64
        switch command {
        case .read(let buffer, let count, let offset):
            rc = nbd_aio_pread(handle, buffer, count, offset, completion, flags.rawValue)
        case .write(let buffer, let count, let offset):
            rc = nbd_aio_pwrite(handle, buffer, count, offset, completion, flags.rawValue)
        case .flush:
            rc = nbd_aio_flush(handle, completion, flags.rawValue)
        case .trim(let count, let offset):
            rc = nbd_aio_trim(handle, count, offset, completion, flags.rawValue)
        case .zero(let count, let offset):
            rc = nbd_aio_zero(handle, count, offset, completion, flags.rawValue)
        }
        if rc < 0 { throw NBDClientError.last() }
    }
}
