import ArgumentParser
import FileExport
import Logging
import NBDServer
import Syscalls
#if canImport(Glibc)
import Glibc
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

    @Option(help: "I/O threads, each with its own io_uring (default: one per CPU).")
    var threads: Int = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .notice

    func validate() throws {
        guard (1...64).contains(threads) else {
            throw ValidationError("--threads must be between 1 and 64, not \(threads)")
        }
    }

    func run() throws {
        let logger = makeLogger(label: "keel.export", level: logLevel)
        let address = try parseListenAddress(listen)
        TerminationSignals.block()
        let device: FileDevice
        do { device = try FileDevice(path: file, readOnly: readOnly, logger: logger) } catch {
            throw CLIError("\(error)")
        }
        let what = "\(file) (\(device.size) bytes, \(device.isDirect ? "O_DIRECT" : "buffered")\(readOnly ? ", read-only" : "")) as '\(name)' with \(threads) thread(s)"
        try serveUntilSignalled(device, on: address, logger: logger, what: what) { listener in
            Server(device: device, listener: listener, exportName: name, threads: threads, logger: logger)
        }
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

func makeLogger(label: String, level: Logger.Level) -> Logger {
    var logger = Logger(label: label) { StreamLogHandler.standardError(label: $0) }
    logger.logLevel = level
    return logger
}
