import ArgumentParser
import Logging
import NBDServer
import Syscalls
#if canImport(Glibc)
import Glibc
import Volumes
#endif

/// What every serving command does after setting up its device: listen,
/// start the I/O threads, wait for SIGINT/SIGTERM, drain, flush, clean up.
func serveUntilSignalled<Device: BlockDevice>(
    _ device: Device, on address: SocketAddress, listener bound: FileDescriptor? = nil, logger: Logger, what: String,
    afterStart: () throws -> Void = {}, beforeStop: () -> Void = {},
    pathAtExit: (() -> String?)? = nil,
    makeServer: (FileDescriptor) -> Server<Device>
) throws {
    let listener = try bound ?? bindListener(address)
    let server = makeServer(listener)
    do { try server.start() } catch {
        listener.close()
        throw KeelError("cannot start the I/O threads: \(error)")
    }
    logger.notice("serving \(what) on \(address)")
    do { try afterStart() } catch {
        server.stop()
        server.wait()
        listener.close()
        throw KeelError("\(error)")
    }

    ServiceManager.notify("READY=1\nSTATUS=serving \(what) on \(address)")

    let signal = TerminationSignals.wait()
    ServiceManager.notify("STOPPING=1")
    logger.notice("signal \(signal): finishing in-flight requests")
    beforeStop()
    server.stop()
    server.wait()
    listener.close()
    if let path = pathAtExit?() ?? address.unixPath { unlink(path) }
    do { try device.flush() } catch {
        throw KeelError("final flush failed: \(error)")
    }
    logger.notice("stopped")
}

/// The listening socket, or a one-line refusal (the address is taken, say).
func bindListener(_ address: SocketAddress) throws -> FileDescriptor {
    do { return try Socket.listen(on: address) } catch {
        throw KeelError("\(error)")
    }
}


/// A size such as 4096, 64M, 10G (binary units).
struct ByteCount: ExpressibleByArgument {
    let bytes: UInt64

    init?(argument: String) {
        let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var text = argument.uppercased()
        if text.hasSuffix("IB") { text.removeLast(2) } else if text.hasSuffix("B") { text.removeLast() }
        var multiplier: UInt64 = 1
        if let last = text.last, let unit = units[last] {
            multiplier = unit
            text.removeLast()
        }
        guard let value = UInt64(text), value.multipliedReportingOverflow(by: multiplier).overflow == false else {
            return nil
        }
        bytes = value * multiplier
    }
}


/// The options every serving command shares.
struct ServingOptions: ParsableArguments {
    @Option(help: "I/O threads, each with its own io_uring (default: one per CPU).")
    var threads: Int = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .notice

    @Option(help: "TLS on the NBD listener: off (plaintext; needed to listen on an address other than loopback without TLS), on (STARTTLS offered), require (nothing served before STARTTLS).")
    var tls: TLSMode?

    @Option(help: ArgumentHelp("With --tls on|require: ca-cert.pem, server-cert.pem and server-key.pem (as `keel cert issue` writes them under STATE/tls/NAME).", valueName: "dir"))
    var tlsCertificates: String?

    @Option(help: ArgumentHelp("With --tls on|require: the clients' pre-shared keys, psktool's format (identity:hex-key lines).", valueName: "file"))
    var tlsPsk: String?

    @Flag(inversion: .prefixedNo, help: "With --tls-certificates: refuse clients without a certificate the CA signed.")
    var tlsVerifyPeer = true

    @Option(help: ArgumentHelp("With --replica-tls require and --tls-psk: the PSK identity the links present.", valueName: "name"))
    var tlsUsername: String?

    func validate() throws {
        guard (1...64).contains(threads) else {
            throw ValidationError("--threads must be between 1 and 64, not \(threads)")
        }
        try validateTLS()
    }
}
