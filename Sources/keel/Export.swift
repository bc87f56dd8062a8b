import ArgumentParser
import FileExport
import Logging
import NBDServer
import Syscalls
#if canImport(Glibc)
import Glibc
import Volumes
#endif

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve a raw image file (or block device) over NBD until SIGINT/SIGTERM.",
        discussion: """
            Examples:
              keel export disk.img --listen unix:/run/keel/disk.sock
              keel export disk.img --listen 127.0.0.1:10809 --name disk --read-only
            """)

    @Argument(help: "The image file or block device to serve.")
    var file: String

    @Option(help: "Where to listen: unix:/path/to.sock or HOST:PORT.")
    var listen: String

    @Option(help: "Export name; the default export \"\" always works too.")
    var name: String = ""

    @Flag(help: "Refuse writes, trims and zeroing (EPERM).")
    var readOnly = false

    @OptionGroup var serving: ServingOptions

    func run() throws {
        let logger = makeLogger(label: "keel.export", level: serving.logLevel)
        let address = try parseListenAddress(listen)
        try serving.refuseUnusedCredentials()
            try serving.checkNBDListener(address, logger: logger)
            let listenerTLS = try serving.serverTLS()
        TerminationSignals.block()
        let device: FileDevice
        do { device = try FileDevice(path: file, readOnly: readOnly, logger: logger) } catch {
            throw KeelError("\(error)")
        }
        let what = "\(file) (\(device.size) bytes, \(device.isDirect ? "O_DIRECT" : "buffered")\(readOnly ? ", read-only" : "")) as '\(name)' with \(serving.threads) thread(s)"
        try serveUntilSignalled(device, on: address, logger: logger, what: what) { listener in
            Server(device: device, listener: listener, exportName: name, tls: listenerTLS, threads: serving.threads, logger: logger)
        }
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
extension SchedulingPolicy: ExpressibleByArgument {}

func makeLogger(label: String, level: Logger.Level) -> Logger {
    var logger = Logger(label: label) { StreamLogHandler.standardError(label: $0) }
    logger.logLevel = level
    return logger
}
