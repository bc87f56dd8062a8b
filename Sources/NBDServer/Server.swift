import IOUring
import Logging
import NBDProtocol
import Syscalls

/// An NBD server: a listening socket shared by `threads` I/O threads, each
/// with its own ring, all serving one block device.
public final class Server<Device: BlockDevice>: @unchecked Sendable {
    public struct Options: Sendable {
        public var threads: Int
        public var exportName: String
        public var description: String

        public init(threads: Int, exportName: String = "", description: String = "") {
            self.threads = threads
            self.exportName = exportName
            self.description = description
        }
    }

    private let device: Device
    private let listener: FileDescriptor
    private let logger: Logger
    private var ioThreads: [IOThread<Device>] = []
    private var osThreads: [PosixThread] = []

    public let export: ExportDescription

    public init(device: Device, listener: FileDescriptor, options: Options, logger: Logger) {
        self.device = device
        self.listener = listener
        self.logger = logger
        export = ExportDescription(name: options.exportName, description: options.description,
                                   size: device.size, readOnly: device.readOnly)
        threadCount = max(1, options.threads)
    }

    private let threadCount: Int

    /// Starts the I/O threads; returns once each has set up its ring, or throws the first failure.
    public func start() throws {
        for id in 0..<threadCount {
            let thread = try IOThread(id: id, device: device, exports: [export], listener: listener,
                                      configuration: .init(), logger: logger)
            let ready = Handoff<Result<Void, Error>>()
            let os = try PosixThread(name: "keel-io-\(id)") { [logger] in
                do { try thread.setUp() } catch {
                    ready.put(.failure(error))
                    return
                }
                ready.put(.success(()))
                do { try thread.run() } catch {
                    logger.critical("I/O thread \(id) failed: \(error)")
                }
            }
            ioThreads.append(thread)
            osThreads.append(os)
            if case .failure(let error) = ready.take() {
                stop()
                wait()
                throw error
            }
        }
    }

    /// Asks every thread to finish in-flight requests and close its connections.
    public func stop() {
        for thread in ioThreads { thread.wake.signal() }
    }

    /// Waits for all threads to end.
    public func wait() {
        for thread in osThreads { thread.join() }
        osThreads.removeAll()
    }
}
